from secret_init.cli import main

raise SystemExit(main())

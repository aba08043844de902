"""The demo's app: prints what an app started by secret-init can see. It prints no secret value."""

import os
import stat
import sys

out_dir = sys.argv[1]
print("\n--- the app, as exec'd by secret-init ---")
print(f"pid {os.getpid()}: secret-init exec'd into this process; no Python supervisor is left behind")
print(f"uid/gid: real, effective, saved = {os.getresuid()} / {os.getresgid()}, groups {os.getgroups()}")
try:
    os.setuid(0)
    print("setuid(0): SUCCEEDED (this would be a bug)")
except PermissionError as e:
    print(f"setuid(0): {e.strerror}: root is gone for good")
with open("/proc/self/status") as f:
    status = dict(line.split(":", 1) for line in f if ":" in line)
print(f"no_new_privs: {status['NoNewPrivs'].strip()}, effective capabilities: {status['CapEff'].strip()}")

print(f"\nfiles in {out_dir} (contents not shown):")
for name in sorted(os.listdir(out_dir)):
    st = os.stat(os.path.join(out_dir, name))
    print(f"  {name:<16} mode {stat.S_IMODE(st.st_mode):04o}  owner {st.st_uid}:{st.st_gid}  {st.st_size} bytes")
try:
    open(os.path.join(out_dir, "planted"), "x").close()
    print("creating a file in the dir: SUCCEEDED (this would be a bug)")
except OSError as e:
    print(f"creating a file in the dir: {e.strerror}")

print("\nenvironment:")
for key in sorted(os.environ):
    if key.endswith("_FILE"):
        print(f"  {key}={os.environ[key]}")
leaked = [k for k in os.environ if k.startswith(("VAULT_", "BAO_", "SECRET_INIT_"))]
print(f"  VAULT_*/BAO_*/SECRET_INIT_* variables: {leaked or 'none'}")

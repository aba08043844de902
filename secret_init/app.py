"""The one-shot flow, top to bottom: materialize -> drop -> exec, or hand over to the loop."""

from collections.abc import Mapping

import structlog

from secret_init import execute, interrupt, privileges
from secret_init.config import Config
from secret_init.materialize import materialize, revoked_on_failure
from secret_init.metrics import NO_METRICS, Recorder


def run(cfg: Config, command: list[str], environ: Mapping[str, str], metrics: Recorder = NO_METRICS) -> int:
    """Materialize, then exec the app as its user; or, with leases or `supervise`, supervise it."""
    done = materialize(cfg, environ, for_app=True, keep_client=True, metrics=metrics)
    with revoked_on_failure(done):  # until the loop owns the leases, or the app is exec'd
        file_vars = {s.env: cfg.file_path(s) for s in cfg.secrets if s.env}
        user_env = done.user.environment() if privileges.is_root() else {}
        values = [m.value.reveal() for m in done.materials]
        env = execute.child_environment(environ, cfg.process.scrub_env, user_env, file_vars, values)
        interrupt.checkpoint()
        if cfg.process.supervise or done.leased:
            from secret_init.loop import Supervised

            supervised = Supervised(cfg, done, command, env, metrics=metrics)
        else:
            if done.client is not None:
                done.client.revoke_own_token()
            if metrics is not NO_METRICS:
                metrics.close()  # the port is the app's to use now
                structlog.get_logger().info("metrics not served", reason="nothing to renew: the app is exec'd")
            interrupt.restore_defaults()  # from here a stop ends us as it would end the app
            interrupt.checkpoint()
    if cfg.process.supervise or done.leased:
        return supervised.run()
    privileges.drop(done.user)
    execute.exec_app(command, env)


def render(cfg: Config, environ: Mapping[str, str]) -> None:
    done = materialize(cfg, environ, for_app=False)
    changed = sum(1 for w in done.written if w.changed)
    structlog.get_logger().info("render done", files=len(done.written), changed=changed)

"""Tools for tests and benchmarks (not the product): a local OpenAI-compatible server with limits and faults."""

from pathlib import Path


def published(run_dir, *parts: str) -> Path:
    """A file or folder of a run's published output (the version its manifest points to), as a local path."""
    from asclepius.run import RunDir

    return Path(RunDir.open(str(run_dir)).output_path(*parts))


def job_env(gcs_address: str, worker_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment `ray job submit --runtime-env-json '{"env_vars": ...}'` gives a job's driver on a running Ray
    instance: its address, and the job's runtime_env (RAY_JOB_CONFIG_JSON_ENV_VAR, which ray.init merges with the
    driver's own). A driver that joins an instance does not pass its environment to that instance's workers, so
    what they need (object storage's test credentials, which a cluster's nodes would hold) goes in `worker_env`."""
    import json
    import os

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    env = {**os.environ, "RAY_ADDRESS": gcs_address}
    if worker_env:
        env[RAY_JOB_CONFIG_JSON_ENV_VAR] = json.dumps({"runtime_env": {"env_vars": dict(worker_env)}})
    return env

"""Building the Serve application (the ingress and the replicas, from ``ServeConfig`` and ``RayConfig``) and
running it: ``livekv serve --ray`` (``run``), ``serve run livekv.serve.ray:build_app`` (``build_app``)."""

import dataclasses
import signal
import tempfile
import threading
import typing

from ray import serve
from ray.serve.config import RequestRouterConfig

from livekv.serve.config import RayConfig, ServeConfig
from livekv.serve.ray.ingress import LiveKVIngress
from livekv.serve.ray.replica import LiveKVReplica
from livekv.serve.ray.routing import APP, SessionRouter


def build(config: ServeConfig, ray_config: RayConfig | None = None):
    """The Serve application: the ingress and the replicas, configured from ``config`` (each replica's server) and
    ``ray_config`` (how many, autoscaling, CPUs). Without a ``state_dir``, a new temporary directory (one machine
    only: replicas on several need a shared one)."""
    ray_config = ray_config or RayConfig()
    config = dataclasses.replace(config, state_dir=config.state_dir or tempfile.mkdtemp(prefix="livekv-ray-state-"),
                                 threads=config.threads or max(1, int(ray_config.replica_cpus)))
    options = dict(ray_actor_options={"num_cpus": ray_config.replica_cpus},
                   max_ongoing_requests=ray_config.max_ongoing_requests,
                   request_router_config=RequestRouterConfig(request_router_class=SessionRouter))
    if ray_config.max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": ray_config.min_replicas,
                                         "initial_replicas": max(ray_config.min_replicas, 1),
                                         "max_replicas": ray_config.max_replicas,
                                         "target_ongoing_requests": ray_config.target_ongoing_requests}
    else:
        options["num_replicas"] = ray_config.replicas
    fields = dataclasses.asdict(config)
    return LiveKVIngress.bind(LiveKVReplica.options(**options).bind(fields), fields)


def build_app(args: dict):
    """``serve run livekv.serve.ray:build_app key=value ...``: any field of ``ServeConfig`` or ``RayConfig``."""
    from livekv.methods import parse_value

    def typed(cls) -> dict:
        hints, out = typing.get_type_hints(cls), {}
        for f in dataclasses.fields(cls):
            if f.name in args:
                value, hint = args[f.name], hints[f.name]
                if isinstance(value, str) and typing.get_origin(hint) is tuple:
                    value = tuple(item for item in value.split(",") if item)
                elif isinstance(value, str):
                    value = parse_value(value, hint)
                out[f.name] = value
        return out

    unknown = set(args) - {f.name for cls in (ServeConfig, RayConfig) for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}: fields of ServeConfig or RayConfig")
    return build(ServeConfig(**typed(ServeConfig)), RayConfig(**typed(RayConfig)))


def run(config: ServeConfig, ray_config: RayConfig) -> None:
    """``livekv serve --ray``: the application on the Ray cluster at ``--ray-address`` (or a new local one), its
    HTTP proxy on ``--host``/``--port``, until SIGINT/SIGTERM; then every replica snapshots its sessions."""
    import ray

    local = ray_config.ray_address is None
    ray.init(address=ray_config.ray_address, include_dashboard=False if local else None)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build(config, ray_config), name=APP, route_prefix="/", blocking=False)
        print(f"livekv on Ray Serve: http://{config.host}:{config.port} ({_replicas_text(ray_config)}); "
              "Ctrl-C stops it", flush=True)
        stop.wait()
    finally:
        print("livekv: stopping (replicas snapshot their sessions)", flush=True)
        serve.delete(APP)
        if local:
            serve.shutdown()
        ray.shutdown()


def _replicas_text(ray_config: RayConfig) -> str:
    if ray_config.max_replicas is not None:
        return f"{ray_config.min_replicas}-{ray_config.max_replicas} replicas, autoscaling"
    return f"{ray_config.replicas} replica{'s' if ray_config.replicas > 1 else ''}"

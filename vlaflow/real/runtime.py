"""The policy behind the node or the server: a torch checkpoint or an ONNX export (``onnx:DIR``).

``merge`` picks the runtime the executor's merge needs, as in sim evaluation: ``rti`` an RTI-DP runtime
(warm-started from the previous chunk), ``rtc`` an RTC runtime (torch only), ``switch`` / ``ensemble`` the
plain one. ONNX exports run on onnxruntime without torch (a robot computer can skip torch entirely).
"""

from __future__ import annotations

from vlaflow.deploy.executor import RealtimeConfig
from vlaflow.errors import ConfigError

ONNX_PREFIX = "onnx:"


def load_runtime(policy: str, merge: str = "switch", device: str = "cpu", runtime_kwargs: dict | None = None):
    """A :class:`~vlaflow.interfaces.RuntimePolicy` for ``policy`` ("CKPT" or "onnx:DIR")."""
    RealtimeConfig(merge=merge)  # a bad merge name is an error before anything is loaded
    kw = dict(runtime_kwargs or {})
    if policy.startswith(ONNX_PREFIX):
        directory = policy[len(ONNX_PREFIX) :]
        if merge == "rtc":
            raise ConfigError(
                "merge 'rtc' needs a torch checkpoint (its guidance uses autograd), not onnx:DIR"
            )
        if merge == "rti":
            from vlaflow.deploy.onnx_rti import OnnxRTIPolicy

            return OnnxRTIPolicy(directory, **kw)
        from vlaflow.deploy.onnx_runtime import OnnxPolicy

        return OnnxPolicy(directory, **kw)
    # torch-heavy loaders are imported here so a robot computer with an ONNX export never needs torch
    if merge == "rti":
        from vlaflow.deploy.rti import load_rti_policy

        return load_rti_policy(policy, device=device, **kw)
    if merge == "rtc":
        from vlaflow.deploy.rtc import load_rtc_policy

        return load_rtc_policy(policy, device=device, **kw)
    from vlaflow.policies.runtime import load_policy

    return load_policy(policy, device=device, **kw)

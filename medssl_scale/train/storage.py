"""encoder.pt on any fsspec path: the backbone's float32 state_dict with the architecture that made it.

The file is a dict that `torch.load(path, weights_only=True)` reads:
    {"format": "medssl-encoder/1", "arch": {depth, width, small_input, input_size, mean, std, preset,
     feature_dim}, "state_dict": {name: tensor}}
Plain state_dicts (torchvision's format, or encoder.pt files of earlier versions) are read too, without arch.
"""

from __future__ import annotations

import hashlib
import io

import fsspec
import torch

ENCODER_FORMAT = "medssl-encoder/1"


def encoder_arch(cfg) -> dict:
    """What a later stage must know to rebuild and feed the encoder of run config `cfg`."""
    from ..augment.policy import policy_from_config
    policy = policy_from_config(cfg.augment)
    m = cfg.model
    return {"depth": m.depth, "width": m.width, "small_input": m.small_input, "input_size": policy.size,
            "mean": list(policy.mean), "std": list(policy.std), "preset": cfg.augment.get("preset"),
            "feature_dim": (512 if m.depth < 50 else 2048) * m.width}


def save_encoder(state_dict: dict, url: str, arch: dict | None = None) -> None:
    buf = io.BytesIO()
    torch.save({"format": ENCODER_FORMAT, "arch": arch,
                "state_dict": {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}}, buf)
    with fsspec.open(url, "wb") as f:
        f.write(buf.getvalue())


def read_encoder(url: str, what: str = "encoder") -> tuple[dict, dict | None]:
    """(state_dict, arch or None) of an encoder.pt or a plain state_dict file."""
    return read_encoder_file(url, what)[:2]


def read_encoder_file(url: str, what: str = "encoder") -> tuple[dict, dict | None, str]:
    """(state_dict, arch or None, sha256 of the file's bytes): the hash names the weights in caches."""
    from ..config import ConfigError

    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{what}: {url} not found") from None
    except Exception as e:  # noqa: BLE001 - pickle/zip errors of a file that is not a torch save
        raise ConfigError(f"{what}: {url} is not a torch state_dict file ({type(e).__name__}: {str(e)[:100]})") from None
    digest = hashlib.sha256(data).hexdigest()
    if isinstance(obj, dict) and obj.get("format") == ENCODER_FORMAT:
        return obj["state_dict"], obj.get("arch"), digest
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None, digest
    raise ConfigError(f"{what}: {url} holds neither an encoder.pt nor a state_dict of tensors")


def load_encoder(url: str) -> dict:
    """The state_dict of an encoder file (see read_encoder)."""
    return read_encoder(url, "model.init_encoder")[0]


def _umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it, which would race
    with files other threads create meanwhile)."""
    import os

    try:
        for line in open("/proc/self/status"):
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_torch_save(obj, path) -> None:
    """torch.save to a local `path` that never holds a partial file: written aside, then renamed.

    Serialized in memory first: torch.save's zip writer refuses some temporary file names."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    # mkstemp makes the file 0600; give it the mode a plain open() would (umask applied), so a feature cache
    # or an encoder in a shared folder is readable by the group as the user's other files are.
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)

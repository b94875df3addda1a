"""Where training runs: the device, mixed precision, and torchrun's processes (nanoGPT's conventions)."""
import os

import torch
import torch.distributed as dist


def setup_distributed() -> tuple[int, int, torch.device | None]:
    """(rank, world_size, device), from torchrun's environment variables when present."""
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):  # started by torchrun, even with 1 process
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))  # no "guessing device ID"
            return rank, world, torch.device("cuda", local)
        dist.init_process_group("gloo")
        return rank, world, torch.device("cpu")
    return 0, 1, None


def pick_device(name: str = "") -> torch.device:
    """torch.device(name), or CUDA when it is there and the CPU when not."""
    return torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype_for(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA where supported, else fp16 (which needs a GradScaler); None on a CPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

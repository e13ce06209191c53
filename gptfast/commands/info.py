"""``gptfast info``: versions, device and which backends can run here."""
import importlib.util
import platform


def register(subparsers):
    p = subparsers.add_parser("info", help="print versions, device and available backends")
    p.set_defaults(func=run)


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    return getattr(__import__(module), "__version__", "unknown")


def run(args) -> int:
    import torch

    import gptfast
    from gptfast.backends import resolve_backend
    from gptfast.ops._dispatch import interpreting, triton_available

    print(f"gptfast      {gptfast.__version__}")
    print(f"python       {platform.python_version()}")
    for module in ("torch", "triton", "transformers", "safetensors", "tokenizers", "numpy"):
        print(f"{module:<12} {_version(module)}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"cuda: {props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}), CUDA {torch.version.cuda}"
    else:
        device = f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    print(f"device       {device}")
    if triton_available() and (torch.cuda.is_available() or interpreting()):
        fused = "Triton kernels" + (" (CPU interpreter)" if interpreting() else "")
    else:
        fused = "falls back to the torch path (needs CUDA + triton, or TRITON_INTERPRET=1)"
    print("backends     reference: yes | torch: yes | fused: " + fused)
    print(f"default      {resolve_backend()}")
    from gptfast.runtime.extension import extension_status

    print(f"sampler      {extension_status(build=False)}")  # never builds: info must be instant
    return 0

"""The Odium Jupyter kernel (IPython's kernel with the odium extension loaded and the hub
started), and the kernelspec that ``odium kernel install`` (odium/cli/kernel.py) installs.

IPython and ipykernel are imported only when the kernel itself starts, so the ``odium``
command can offer ``odium kernel install`` without paying for them (or needing them).

    odium kernel install --user          # then pick "Odium (Python 3)" in Jupyter
    python -m odium.jupyter.kernel -f CONN.json  # what Jupyter runs (kernelspec/odium/kernel.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

KERNEL_NAME = "odium"
DISPLAY_NAME = "Odium (Python 3)"
LOGOS = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")


def kernel_spec(executable: str | None = None, display_name: str = DISPLAY_NAME
                ) -> dict[str, Any]:
    """The kernel.json of the Odium kernel, run by ``executable`` (default: this Python)."""
    return {
        "argv": [executable or sys.executable, "-m", "odium.jupyter.kernel", "-f",
                 "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",  # the stop button is a KeyboardInterrupt: it reaches nodes
        "metadata": {"debugger": False},
    }


def install(*, user: bool = False, prefix: str | None = None, name: str = KERNEL_NAME,
            display_name: str = DISPLAY_NAME) -> str:
    """Install the kernelspec (system-wide, ``user``, or under ``prefix``); its directory."""
    import shutil  # (here: every odium command builds the parser that names this module)
    import tempfile

    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory(prefix="odium-kernelspec-") as td:
        src = Path(td) / name
        src.mkdir()
        (src / "kernel.json").write_text(json.dumps(kernel_spec(None, display_name), indent=1)
                                         + "\n")
        try:  # ipykernel's logos, when it is there to give them
            import ipykernel

            res = Path(ipykernel.__file__).parent / "resources"
            for logo in LOGOS:
                if (res / logo).exists():
                    shutil.copy(res / logo, src / logo)
        except ImportError:
            pass
        return str(KernelSpecManager().install_kernel_spec(str(src), name, user=user,
                                                           prefix=prefix))


# --- the kernel -----------------------------------------------------------------------------------


def kernel_class() -> type:
    """IPython's kernel with the odium extension loaded: the hub starts with the kernel."""
    from ipykernel.ipkernel import IPythonKernel

    from ..version import __version__

    class OdiumKernel(IPythonKernel):
        implementation = "odium"
        implementation_version = __version__

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            assert self.shell is not None
            self.shell.extension_manager.load_extension("odium")  # so %unload_ext odium works

        @property
        def banner(self) -> str:  # type: ignore[override]
            from . import current

            base = self.shell.banner if self.shell else ""
            magics = current()
            try:
                line = magics.hello() if magics is not None else "odium is not loaded"
            except Exception as e:  # noqa: BLE001 - a banner must not fail
                line = f"the odium hub is not running: {e}"
            return f"{base}\n{line}\n"

        def do_shutdown(self, restart: bool) -> Any:
            from . import current

            magics = current()
            if magics is not None:
                magics.stop_hub()  # its local nodes stop now, not at interpreter exit
            return super().do_shutdown(restart)

    return OdiumKernel


def main(argv: list[str] | None = None) -> None:
    """Start the Odium kernel (``python -m odium.jupyter.kernel -f CONNECTION_FILE``)."""
    from ipykernel.kernelapp import IPKernelApp

    IPKernelApp.launch_instance(argv=argv, kernel_class=kernel_class())


if __name__ == "__main__":
    main()

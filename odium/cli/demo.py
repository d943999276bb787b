"""``odium demo``: a hub and local nodes in a temporary home, one Python and one shell broadcast."""

from __future__ import annotations

import sys
import time

from ..api.hub import Hub, remove_home, temporary_home
from ..core.results import format_text


def run_demo(n: int = 3) -> int:
    t0 = time.perf_counter()
    home = temporary_home("odium-demo-")
    color = sys.stdout.isatty()
    try:
        with Hub(home, ports=0) as hub:
            print(f"hub on 127.0.0.1 ports {hub.ports} (temporary home {home})")
            hub.start_local(n, prefix="demo")
            t_ready = time.perf_counter() - t0
            print(f"{n} local nodes ready after {t_ready:.2f} s\n")
            code = ("import os, platform, socket\n"
                    "print(f'hello from pid {os.getpid()} on {socket.gethostname()}')\n"
                    "sum(i * i for i in range(1000))")
            print(f"$ python broadcast to '*':\n{code}\n")
            r1 = hub.run(code, nodes="*", timeout=10)
            print(format_text(r1, color))
            print("\n$ shell broadcast to 'demo-1,demo-2': echo $PWD; python3 --version\n")
            r2 = hub.run("echo $PWD; python3 --version", nodes="demo-1,demo-2", shell=True,
                         timeout=10)
            print(format_text(r2, color))
            ok = r1.ok and r2.ok
        print(f"\ndone in {time.perf_counter() - t0:.2f} s: "
              f"{'all nodes ok' if ok else 'some nodes failed'}")
        return 0 if ok else 1
    finally:
        remove_home(home)

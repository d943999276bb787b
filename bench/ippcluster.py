"""ipyparallel, for the benchmarks that compare with it: a cluster of local engines in a
throwaway profile, started and connected, stopped and removed at the end."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def have_ipp(out: dict[str, Any]) -> bool:
    """Whether ipyparallel imports: its version in ``out["version"]``, else why not in
    ``out["error"]``."""
    try:
        import ipyparallel as ipp
    except Exception as e:
        out["error"] = f"ipyparallel not importable: {type(e).__name__}: {e}"
        return False
    out["version"] = ipp.__version__
    return True


@contextmanager
def ipp_cluster(engines: int, out: dict[str, Any], prefix: str) -> Iterator[Any]:
    """A connected ``ipyparallel.Client`` of ``engines`` engines; a failure to stop the
    cluster is noted in ``out["stop_error"]``."""
    import ipyparallel as ipp

    cluster = None
    profile_dir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        cluster = ipp.Cluster(n=engines, profile_dir=str(profile_dir), log_level=40,
                              controller_ip="127.0.0.1")
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(engines, timeout=120)
        yield rc
    finally:
        if cluster is not None:
            try:
                cluster.stop_cluster_sync()
            except Exception as e:
                out["stop_error"] = f"{type(e).__name__}: {e}"
        shutil.rmtree(profile_dir, ignore_errors=True)

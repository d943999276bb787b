"""The notebook view (issue 9, item 12): plots from many nodes in a grid, not one per row;
a ``--bg`` cell saved to HTML shows its Result, not a stale "0 of n nodes done".

The grid is checked on Results built in the test; the ``--bg`` cell in a real kernel
(nbclient), with a real hub and real local nodes, exported to HTML by nbconvert.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from odium.core.results import NodeResult, Result, Status
from odium.jupyter import display as D

from .conftest import HB

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 24).decode()


def plot(node: str, status: Status = Status.OK, n: int = 1) -> NodeResult:
    return NodeResult(node, status, stdout=f"{node} drew\n",
                      outputs=[{"data": {"image/png": PNG, "text/plain": "<Figure>"},
                                "metadata": {}}] * n)


def test_identical_shape_outputs_of_many_nodes_are_laid_out_in_a_grid() -> None:
    nodes = {f"n-{i}": plot(f"n-{i}") for i in range(1, 7)}
    nodes["n-7"] = NodeResult("n-7", Status.ERROR, error={"ename": "ValueError",
                                                          "evalue": "no data"})
    html = D.render_html(Result("c" * 32, nodes, "s"))
    grids = re.findall(r'<div class="odium-grid" style="display:grid;[^"]*">', html)
    assert len(grids) == 1
    cards = re.findall(r'<figure class="odium-card" data-node="([^"]+)"', html)
    assert cards == [f"n-{i}" for i in range(1, 7)]  # the node without a plot is not in it
    assert html.count(f"data:image/png;base64,{PNG}") == 6  # each plot once: in the grid
    assert html.index("odium-grid") < html.index("odium-table")
    # the table still has every node's row, its stdout, and says where its plot is
    assert re.findall(r'<tr class="odium-row" data-node="([^"]+)"', html) == [
        f"n-{i}" for i in range(1, 8)]
    assert html.count("in the grid above") == 6 and html.count("n-3 drew") == 1
    assert "ValueError: no data" in html


def test_no_grid_for_one_plot_or_for_outputs_of_different_shapes() -> None:
    one = D.render_html(Result("c" * 32, {"a": plot("a"), "b": NodeResult("b", Status.OK)}, "s"))
    assert "odium-grid" not in one and one.count("data:image/png") == 1
    mixed = D.render_html(Result("c" * 32, {"a": plot("a"), "b": plot("b", n=2)}, "s"))
    assert "odium-grid" not in mixed and mixed.count("data:image/png") == 3
    text = {"a": NodeResult("a", Status.OK, outputs=[{"data": {"text/plain": "x"}}]),
            "b": NodeResult("b", Status.OK, outputs=[{"data": {"text/plain": "y"}}])}
    assert "odium-grid" not in D.render_html(Result("c" * 32, text, "s"))


nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


@pytest.mark.timeout(120)
def test_a_bg_cell_saved_to_html_shows_its_result_and_no_stale_progress(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbconvert = pytest.importorskip("nbconvert")
    for k, v in {"ODIUM_HOME": str(tmp_path / "home"), "ODIUM_PORTS": "0",
                 "ODIUM_HEARTBEAT": str(max(HB, 0.5))}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("ODIUM_APP", raising=False)
    v4 = nbformat.v4
    nb = v4.new_notebook(cells=[
        v4.new_code_cell("%load_ext odium"),
        v4.new_code_cell("%odium local 2"),
        # sleeps long enough that the cell returns (and is saved) before the nodes are done
        v4.new_code_cell("%%odium --bg -o job\nimport time\ntime.sleep(1.5)\n'slept'"),
        v4.new_code_cell("r = job.result(60)\nimport time\nt = time.monotonic() + 30\n"
                         "while job._thread.is_alive() and time.monotonic() < t:\n"
                         "    time.sleep(0.02)  # the kernel waits for its own display thread\n"
                         "(job._thread.is_alive(), r.values())"),
        v4.new_code_cell("%odium stop"),
    ])
    client = nbclient.NotebookClient(nb, timeout=90, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    waited = "".join(o.get("data", {}).get("text/plain", "") for o in nb.cells[3].outputs)
    assert waited == "(False, ['slept', 'slept'])", nb.cells[3].outputs
    bg = nb.cells[2].outputs
    html, _ = nbconvert.HTMLExporter().from_notebook_node(nb)
    bg_html = "".join(o.get("data", {}).get("text/html", "") for o in bg)
    assert re.findall(r'<tr class="odium-row" data-node="[^"]+" data-status="([^"]+)"',
                      bg_html) == ["ok"] * 2  # the live display became the Result
    assert "nodes done" not in "".join(str(o) for o in bg)
    assert "background command" not in "".join(str(o) for o in bg)
    assert "nodes done" not in html and html.count('class="odium-result"') == 1

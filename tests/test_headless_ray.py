"""`batch --ray`: the built-in runner's contract on Ray Data, against fake ComfyUIs and an in-process Ray.

One Ray (``ray.init``, 2 CPUs) is shared by the whole session: Ray's own start takes seconds.
Real ComfyUI servers and a ``ray start --head`` cluster: tests/test_headless_ray_server.py.
"""
from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray runner needs ray[data]: pip install 'gentor[ray]'")
pytest.importorskip("ray.data", reason="the Ray runner needs ray[data]: pip install 'gentor[ray]'")
pq = pytest.importorskip("pyarrow.parquet", reason="the Ray runner needs pyarrow (a ray[data] dependency)")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gentor_headless.cli import main  # noqa: E402
from tests.headless_helpers import FakeComfy, blend_workflow, free_port, png_bytes, trivial_workflow, wait_for, \
    write_csv_rows  # noqa: E402
from tests.test_headless_batch import output_prompt, read_results  # noqa: E402

SAMPLER = {"class_type": "FakeSampler", "inputs": {"image": ["12", 0], "seed": 100, "steps": 2, "text": "x",
                                                    "mode": "a"}}
MAPS = ["--map", "ref_1=10.image", "--map", "ref_2=second.image", "--map", "instruction=14.text"]
COMPARED = ["row_id", "name", "status", "output_files", "seed", "error"]  # all but server and seconds


@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray for the session (the CLI's --ray joins it: ray.is_initialized())."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"py_modules": [str(ROOT / "gentor_headless")]})
    yield ray
    ray.shutdown()


def setup(tmp_path: Path, fake: FakeComfy, rows: int = 12, bad: int | None = 5) -> tuple[Path, Path]:
    """A multi-reference edit dataset (two image columns: files and URLs) with one bad row (missing file)."""
    wf = blend_workflow()
    wf["14"] = SAMPLER
    wf["13"]["inputs"]["images"] = ["14", 0]
    (tmp_path / "wf.json").write_text(json.dumps(wf))
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = []
    for i in range(rows):
        (tmp_path / "img" / f"a{i}.png").write_bytes(png_bytes(rgb=(i, 0, 0)))
        fake.static[f"b{i}.png"] = png_bytes(rgb=(0, i, 0))
        lines.append({"ref_1": f"img/a{i}.png" if i != bad else "img/missing.png",
                      "ref_2": f"{fake.url}/static/b{i}.png", "instruction": f"make it {i}", "out": f"pic {i}"})
    data = tmp_path / "rows.csv"
    write_csv_rows(data, lines)
    return tmp_path / "wf.json", data


def batch(wf: Path, data: Path, out: Path, servers: list[str], *extra: str, ray_run: bool = True) -> int:
    args = ["batch", str(wf), "--data", str(data), "--out", str(out), *MAPS, *extra]
    for url in servers:
        args += ["--server", url]
    return main(args + (["--ray"] if ray_run else []))


def comparable(path: Path) -> list[dict[str, str]]:
    return [{k: r.get(k, "") for k in COMPARED} for r in read_results(path)]


def test_same_outputs_and_results_as_builtin_runner(ray_local, tmp_path):
    with FakeComfy(delay=0.02) as a, FakeComfy(delay=0.02) as b:
        wf, data = setup(tmp_path, a)
        extra = ("--name-column", "out", "--seed-policy", "row")
        assert batch(wf, data, tmp_path / "builtin", [a.url, b.url], *extra, ray_run=False) == 1
        assert batch(wf, data, tmp_path / "ray", [a.url, b.url], *extra) == 1
        assert a.posted and b.posted
    want, got = comparable(tmp_path / "builtin" / "results.csv"), comparable(tmp_path / "ray" / "results.csv")
    assert got == want and len(got) == 12
    assert [r["status"] for r in got].count("error") == 1 and "img/missing.png" in got[5]["error"]
    assert [r["seed"] for r in got if r["status"] == "ok"] == [str(100 + i) for i in range(12) if i != 5]
    names = sorted(p.name for p in (tmp_path / "builtin").glob("*.png"))
    assert names == sorted(p.name for p in (tmp_path / "ray").glob("*.png")) and len(names) == 11
    for name in names:  # the same prompt (mapped values, uploads by content, seeds) reached the server
        assert output_prompt(tmp_path / "ray" / name) == output_prompt(tmp_path / "builtin" / name)
    parquet = pq.read_table(tmp_path / "ray" / "results.parquet").to_pylist()
    assert sorted((r["row_id"], r["status"]) for r in parquet) == sorted((r["row_id"], r["status"]) for r in got)
    assert list(pq.read_table(tmp_path / "ray" / "results.parquet").column_names) == \
        ["row_id", "name", "status", "output_files", "seed", "server", "seconds", "error"]
    assert not [p for p in (tmp_path / "ray").iterdir() if p.name.startswith(".dl-")]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_jsonl_and_parquet_datasets_read_by_ray(ray_local, tmp_path, kind):
    import pyarrow as pa

    rows = [{"w": 8, "seed": 77}, {"w": 9, "seed": None}, {"w": 10, "seed": 5}]
    data = tmp_path / f"rows.{kind}"
    if kind == "jsonl":
        data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), data)
    w = trivial_workflow()
    w["3"] = {"class_type": "FakeSampler", "inputs": {"image": ["1", 0], "seed": 5, "steps": 1, "text": "",
                                                      "mode": "a"}}
    w["2"]["inputs"]["images"] = ["3", 0]
    (tmp_path / "wf.json").write_text(json.dumps(w))
    with FakeComfy() as fake:
        rc = main(["batch", str(tmp_path / "wf.json"), "--data", str(data), "--out", str(tmp_path / "o"),
                   "--server", fake.url, "--map", "w=1.width", "--ray"])
        widths = sorted(p[1]["1"]["inputs"]["width"] for p in fake.posted)
    assert rc == 0 and widths == [8, 9, 10]
    assert [(r["row_id"], r["seed"]) for r in read_results(tmp_path / "o" / "results.csv")] == \
        [("0", "77"), ("1", "5"), ("2", "5")]


def test_workflow_failing_validation_stops_the_run(ray_local, tmp_path, capsys):
    with FakeComfy() as fake:
        wf, data = setup(tmp_path, fake, bad=None)
        rc = batch(wf, data, tmp_path / "out", [fake.url], "--set", "14.steps=500")
        posted = sum(1 for m, p in fake.requests if (m, p) == ("POST", "/prompt"))
    assert rc == 2 and "Value bigger than max: steps, 500 > 100" in capsys.readouterr().err
    assert posted == 1 and not fake.posted  # one actor, one prompt: refused; nothing ran
    assert [r["status"] for r in read_results(tmp_path / "out" / "results.csv")] == ["error"]


def test_server_killed_mid_run_loses_and_duplicates_nothing(ray_local, tmp_path):
    with FakeComfy(delay=0.1) as a, FakeComfy(delay=0.1) as b:
        wf, data = setup(tmp_path, b, bad=None)
        killer = threading.Thread(target=lambda: wait_for(lambda: len(a.posted) >= 2, 60) and a.kill())
        killer.start()
        rc = batch(wf, data, tmp_path / "out", [a.url, b.url], "--server-wait", "5")
        killer.join()
        done_a = {p[1]["14"]["inputs"]["text"] for p in a.posted if p[0] in a.history}
        done_b = [p[1]["14"]["inputs"]["text"] for p in b.posted if p[0] in b.history]
    results = read_results(tmp_path / "out" / "results.csv")
    assert rc == 0 and [(r["row_id"], r["status"]) for r in results] == [(str(i), "ok") for i in range(12)]
    assert len(a.posted) > len(done_a)  # a row was in flight on a when it died ...
    assert not done_a & set(done_b) and len(done_a) + len(done_b) == 12  # ... and ran once, on b
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(f"{i}_0.png" for i in range(12))


def test_resume_runs_only_rows_not_done(ray_local, tmp_path, capsys):
    with FakeComfy() as fake:
        wf, data = setup(tmp_path, fake, rows=6, bad=None)
        out = tmp_path / "out"
        assert batch(wf, data, out, [fake.url]) == 0
        assert batch(wf, data, out, [fake.url]) == 2 and "--resume" in capsys.readouterr().err
        # a crash: row 4's result rows lost, row 2's image written but not its done marker, row 1's file gone
        shutil.rmtree(out / "results.parquet")
        (out / "results.csv").unlink()
        (out / ".gentor-rows" / "2.json").unlink()
        (out / "1_0.png").unlink()
        before = len(fake.posted)
        assert batch(wf, data, out, [fake.url], "--resume") == 0
        rerun = sorted(p[1]["14"]["inputs"]["text"] for p in fake.posted[before:])
    assert rerun == ["make it 1", "make it 2"]
    results = read_results(out / "results.csv")
    assert [(r["row_id"], r["status"], r["output_files"]) for r in results] == \
        [(str(i), "ok", f"{i}_0.png") for i in range(6)]


def test_duplicate_output_names_fail_the_later_row(ray_local, tmp_path):
    with FakeComfy() as fake:
        wf, data = setup(tmp_path, fake, rows=3, bad=None)
        data.write_text(data.read_text().replace("pic 2", "pic 0"))
        rc = batch(wf, data, tmp_path / "out", [fake.url], "--name-column", "out")
    results = {r["row_id"]: r for r in read_results(tmp_path / "out" / "results.csv")}
    assert rc == 1 and results["0"]["status"] == "ok" and results["1"]["status"] == "ok"
    assert results["2"]["error"] == ("output name 'pic_0' is already used by row 0; names in the name column "
                                     "must be unique")


def test_no_server_reachable_fails_rows_with_reason(ray_local, tmp_path):
    with FakeComfy() as fake:
        wf, data = setup(tmp_path, fake, rows=2, bad=None)
    rc = batch(wf, data, tmp_path / "out", [f"http://127.0.0.1:{free_port()}"], "--server-wait", "1",
               "--retries", "1")
    results = read_results(tmp_path / "out" / "results.csv")
    assert rc == 1 and [r["status"] for r in results] == ["error", "error"]
    assert all("no ComfyUI server reachable for 1s" in r["error"] for r in results)


def test_actor_that_cannot_start_its_server_stops_the_run_with_the_reason(ray_local, tmp_path, capsys):
    with FakeComfy() as fake:
        wf, data = setup(tmp_path, fake, rows=1, bad=None)
    rc = main(["batch", str(wf), "--data", str(data), "--out", str(tmp_path / "out"), *MAPS, "--ray",
               "--comfyui", str(tmp_path / "no-comfyui"), "--gpus-per-actor", "0", "--cpus-per-actor", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and "Ray stopped the run" in err and "no main.py there" in err, err


def test_unreachable_cluster_address_is_refused_clearly(tmp_path, monkeypatch, capsys):
    # Ray itself takes ~40 s to give up on an address nobody serves; its answer is stood in for here.
    from gentor_headless import ray_runner

    def refuse(**kwargs):
        raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}")

    monkeypatch.setattr(ray_runner.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_runner.ray, "init", refuse)
    with FakeComfy() as fake:
        wf, data = setup(tmp_path, fake, rows=1, bad=None)
        rc = batch(wf, data, tmp_path / "out", [fake.url], "--ray=10.0.0.9:6379", ray_run=False)
        assert not fake.posted
    err = capsys.readouterr().err
    assert rc == 1 and "could not join the Ray cluster at '10.0.0.9:6379': Failed to connect to Ray cluster at " \
        "10.0.0.9:6379. Check the address (`ray status` on the head node)" in err, err

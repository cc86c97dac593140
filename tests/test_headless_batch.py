"""`batch`: datasets, mapping, uploads, retries, several servers, resume, Ctrl-C — against fake ComfyUIs."""
from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gentor_headless.cli import main  # noqa: E402
from tests.headless_helpers import FakeComfy, PNG_MAGIC, blend_workflow, free_port, png_bytes, \
    trivial_workflow, wait_for, write_csv_rows  # noqa: E402

SAMPLER = {"class_type": "FakeSampler", "inputs": {"image": ["12", 0], "seed": 100, "steps": 2, "text": "x",
                                                    "mode": "a"}}


def read_results(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def output_prompt(path: Path) -> dict:
    """The prompt a fake output file was produced from."""
    return json.loads(path.read_bytes()[len(PNG_MAGIC):])["prompt"]


def edit_setup(tmp_path: Path, fake: FakeComfy, rows: int = 6) -> tuple[Path, Path]:
    """A dataset with two image columns (local files and http URLs), an instruction and a name."""
    wf = blend_workflow()
    wf["14"] = SAMPLER
    wf["13"]["inputs"]["images"] = ["14", 0]
    (tmp_path / "wf.json").write_text(json.dumps(wf))
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(rows):
        (tmp_path / "img" / f"a{i}.png").write_bytes(png_bytes(rgb=(i, 0, 0)))
        fake.static[f"b{i}.png"] = png_bytes(rgb=(0, i, 0))
        lines.append({"image_url": f"img/a{i}.png", "image_url_2": f"{fake.url}/static/b{i}.png",
                      "instruction": f"make it {i}", "out_name": f"pic{i}.png"})
    data = tmp_path / "rows.csv"
    write_csv_rows(data, lines)
    return tmp_path / "wf.json", data


EDIT_MAPS = ["--map", "image_url=10.image", "--map", "image_url_2=second.image", "--map", "instruction=14.text"]


def batch(wf: Path, data: Path, out: Path, servers: list[str], *extra: str) -> int:
    args = ["batch", str(wf), "--data", str(data), "--out", str(out), *EDIT_MAPS, *extra]
    for url in servers:
        args += ["--server", url]
    return main(args)


def test_dataset_two_image_columns(tmp_path, capsys):
    with FakeComfy() as fake:
        wf, data = edit_setup(tmp_path, fake)
        rc = batch(wf, data, tmp_path / "out", [fake.url], "--name-column", "out_name", "--seed-policy", "row")
    assert rc == 0, capsys.readouterr()
    results = read_results(tmp_path / "out" / "results.csv")
    assert list(results[0]) == ["row_id", "name", "status", "output_files", "seed", "server", "seconds", "error"]
    assert [r["status"] for r in results] == ["ok"] * 6
    assert [r["seed"] for r in results] == [str(100 + i) for i in range(6)]
    for i, r in enumerate(results):
        assert r["output_files"] == f"pic{i}_0.png" and r["server"] == fake.url
        prompt = output_prompt(tmp_path / "out" / f"pic{i}_0.png")
        assert prompt["14"]["inputs"]["text"] == f"make it {i}"
        assert fake.uploads[prompt["10"]["inputs"]["image"]] == png_bytes(rgb=(i, 0, 0))
        assert fake.uploads[prompt["11"]["inputs"]["image"]] == png_bytes(rgb=(0, i, 0))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_jsonl_dataset_and_seed_column(tmp_path):
    with FakeComfy() as fake:
        wf = tmp_path / "wf.json"
        w = trivial_workflow()
        w["3"] = {"class_type": "FakeSampler", "inputs": {"image": ["1", 0], "seed": 5, "steps": 1,
                                                          "text": "", "mode": "a"}}
        w["2"]["inputs"]["images"] = ["3", 0]
        wf.write_text(json.dumps(w))
        data = tmp_path / "rows.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in [{"w": 8, "seed": 77}, {"w": 9}, {"w": 10, "seed": ""}]))
        rc = main(["batch", str(wf), "--data", str(data), "--out", str(tmp_path / "o"), "--server", fake.url,
                   "--map", "w=1.width"])
        assert rc == 0
        results = read_results(tmp_path / "o" / "results.csv")
        assert [r["seed"] for r in results] == ["77", "5", "5"]
        assert sorted(p[1]["1"]["inputs"]["width"] for p in fake.posted) == [8, 9, 10]


def test_bad_rows_fail_alone(tmp_path):
    with FakeComfy() as fake:
        wf, data = edit_setup(tmp_path, fake, rows=4)
        (tmp_path / "img" / "a1.png").unlink()
        text = data.read_text().replace(f"{fake.url}/static/b2.png", f"http://127.0.0.1:{free_port()}/gone.png")
        data.write_text(text)
        rc = batch(wf, data, tmp_path / "out", [fake.url])
    assert rc == 1
    results = {r["row_id"]: r for r in read_results(tmp_path / "out" / "results.csv")}
    assert [results[k]["status"] for k in "0123"] == ["ok", "error", "error", "ok"]
    assert "image file 'img/a1.png' not found" in results["1"]["error"]
    assert "gone.png could not be downloaded" in results["2"]["error"]
    assert "refused" in results["2"]["error"].lower()


def test_wrong_columns_are_listed(tmp_path, capsys):
    with FakeComfy() as fake:
        wf, data = edit_setup(tmp_path, fake, rows=1)
        rc = main(["batch", str(wf), "--data", str(data), "--server", fake.url, "--map", "image=10.image"])
        err = capsys.readouterr().err
        assert rc == 2 and not fake.posted
    assert "--map image=10.image names column 'image'" in err
    assert "its columns are: image_url, image_url_2, instruction, out_name" in err


def test_unknown_map_target_lists_nodes(tmp_path, capsys):
    with FakeComfy() as fake:
        wf, data = edit_setup(tmp_path, fake, rows=1)
        rc = main(["batch", str(wf), "--data", str(data), "--server", fake.url, "--map", "instruction=14.prompt"])
        err = capsys.readouterr().err
        assert rc == 2 and not fake.posted
    assert "node 14 FakeSampler has no input 'prompt'" in err
    assert "its inputs are: image, seed, steps, text, mode" in err
    assert '10 LoadImage "first": image' in err


def test_validation_failure_stops_before_the_rest(tmp_path, capsys):
    with FakeComfy() as fake:
        wf, data = edit_setup(tmp_path, fake)
        rc = batch(wf, data, tmp_path / "out", [fake.url], "--set", "14.steps=500")
        err = capsys.readouterr().err
    assert rc == 2
    assert "* FakeSampler 14:" in err and "Value bigger than max: steps, 500 > 100" in err
    assert sum(1 for m, p in fake.requests if (m, p) == ("POST", "/prompt")) == 1
    assert [r["status"] for r in read_results(tmp_path / "out" / "results.csv")] == ["error"]


def test_invalid_cell_fails_its_row_only(tmp_path, capsys):
    with FakeComfy() as fake:
        wf = tmp_path / "wf.json"
        wf.write_text(json.dumps(trivial_workflow()))
        data = tmp_path / "rows.csv"
        data.write_text("w\n8\n99999\n9\n")
        rc = main(["batch", str(wf), "--data", str(data), "--out", str(tmp_path / "o"), "--server", fake.url,
                   "--map", "w=1.width"])
    results = read_results(tmp_path / "o" / "results.csv")
    assert rc == 1 and [r["status"] for r in results] == ["ok", "error", "ok"]
    assert "* EmptyImage 1: |   - Value bigger than max: width, 99999 > 4096" in results[1]["error"]


@pytest.mark.parametrize("retries,status", [(1, "ok"), (0, "error")])
def test_retries(tmp_path, retries, status):
    with FakeComfy() as fake:
        wf, data = edit_setup(tmp_path, fake, rows=2)
        data.write_text(data.read_text().replace("make it 1", "FAIL_ONCE"))
        rc = batch(wf, data, tmp_path / "out", [fake.url], "--retries", str(retries))
    results = read_results(tmp_path / "out" / "results.csv")
    assert results[1]["status"] == status and rc == (0 if status == "ok" else 1)
    if status == "error":
        assert "node 14 (FakeSampler) raised RuntimeError: forced failure (once)" in results[1]["error"]


def test_two_servers_share_rows(tmp_path):
    with FakeComfy(delay=0.05) as a, FakeComfy(delay=0.05) as b:
        wf, data = edit_setup(tmp_path, a, rows=8)
        assert batch(wf, data, tmp_path / "out", [a.url, b.url]) == 0
        assert len(a.posted) + len(b.posted) == 8 and a.posted and b.posted
    servers = {r["server"] for r in read_results(tmp_path / "out" / "results.csv")}
    assert servers == {a.url, b.url}


def test_server_killed_mid_run_rows_go_elsewhere(tmp_path):
    with FakeComfy(delay=0.1) as a, FakeComfy(delay=0.1) as b:
        wf, data = edit_setup(tmp_path, b, rows=8)
        killer = threading.Thread(target=lambda: wait_for(lambda: len(a.posted) >= 2, 10) and a.kill())
        killer.start()
        rc = batch(wf, data, tmp_path / "out", [a.url, b.url], "--server-wait", "5")
        killer.join()
    results = read_results(tmp_path / "out" / "results.csv")
    assert rc == 0 and [r["row_id"] for r in results] == [str(i) for i in range(8)]
    assert all(r["status"] == "ok" for r in results)
    a_rows = {r["row_id"] for r in results if r["server"] == a.url}
    assert len(a_rows) <= 2 and len(b.posted) >= 6  # the row in flight on a was re-run on b
    assert len(a.history) == len(a_rows)


def test_all_servers_gone_rows_fail_with_reason(tmp_path, capsys):
    fake = FakeComfy(delay=0.1)
    wf, data = edit_setup(tmp_path, fake, rows=4)
    killer = threading.Thread(target=lambda: wait_for(lambda: len(fake.posted) >= 1, 10) and fake.kill())
    killer.start()
    rc = batch(wf, data, tmp_path / "out", [fake.url], "--server-wait", "0.5")
    killer.join()
    out = capsys.readouterr()
    assert rc == 1 and "no ComfyUI server reachable" in out.err
    results = read_results(tmp_path / "out" / "results.csv")
    assert len(results) == 4 and all(r["status"] == "error" for r in results)
    assert "restart one and run again with --resume" in results[-1]["error"]


def test_no_server_at_start(tmp_path, capsys):
    with FakeComfy() as fake:
        wf, data = edit_setup(tmp_path, fake, rows=1)
    rc = batch(wf, data, tmp_path / "out", [f"http://127.0.0.1:{free_port()}"])
    assert rc == 3 and "no ComfyUI server is reachable" in capsys.readouterr().err


def test_resume_skips_ok_rows_and_refuses_silent_overwrite(tmp_path, capsys):
    with FakeComfy() as fake:
        wf, data = edit_setup(tmp_path, fake, rows=4)
        data.write_text(data.read_text().replace("make it 2", "FAIL_ALWAYS"))
        assert batch(wf, data, tmp_path / "out", [fake.url], "--retries", "0") == 1
        assert batch(wf, data, tmp_path / "out", [fake.url]) == 2
        assert "--resume" in capsys.readouterr().err
        data.write_text(data.read_text().replace("FAIL_ALWAYS", "make it 2"))
        posted = len(fake.posted)
        assert batch(wf, data, tmp_path / "out", [fake.url], "--resume") == 0
        assert len(fake.posted) == posted + 1
    results = read_results(tmp_path / "out" / "results.csv")
    assert [(r["row_id"], r["status"]) for r in results] == [(str(i), "ok") for i in range(4)]


def test_ctrl_c_interrupts_and_resume_completes(tmp_path):
    # Rows 0 and 1 run quickly; row 2 runs until interrupted, so Ctrl-C certainly lands while a prompt is in
    # flight (with a fixed delay a loaded machine could send it between two prompts: nothing to interrupt).
    held = {"make it 2"}
    with FakeComfy(delay=0.05, hold=lambda prompt: prompt["14"]["inputs"]["text"] in held) as fake:
        wf, data = edit_setup(tmp_path, fake, rows=6)
        cmd = [sys.executable, str(ROOT / "headless.py"), "batch", str(wf), "--data", str(data),
               "--out", str(tmp_path / "out"), "--server", fake.url, "--name-column", "out_name", *EDIT_MAPS]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        results_csv = tmp_path / "out" / "results.csv"
        try:
            assert wait_for(lambda: results_csv.exists() and len(read_results(results_csv)) >= 2, 60)
            assert wait_for(lambda: fake._running is not None, 20)  # row 2, held until interrupted
            running = fake._running
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, err
        assert running in fake.interrupts, (running, fake.interrupts)  # the prompt in flight was interrupted
        first = read_results(results_csv)
        assert [(r["row_id"], r["status"]) for r in first] == [("0", "ok"), ("1", "ok"), ("2", "interrupted")]
        done = {r["row_id"] for r in first if r["status"] == "ok"}
        held.clear()
        rc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=60).returncode
        assert rc == 0
        ids = [p[1]["14"]["inputs"]["text"] for p in fake.posted if p[0] in fake.history
               and fake.history[p[0]]["status"]["status_str"] == "success"]
    final = read_results(results_csv)
    assert [(r["row_id"], r["status"]) for r in final] == [(str(i), "ok") for i in range(6)]
    assert sorted(set(ids)) == sorted(f"make it {i}" for i in range(6))
    assert len(ids) == 6 and len(done) >= 2  # no row ran twice to success, none lost
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [f"pic{i}_0.png" for i in range(6)]


def test_unwritable_results_stops_cleanly(tmp_path, capsys, monkeypatch):
    from gentor_headless import results as results_module

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with FakeComfy() as fake:
        wf, data = edit_setup(tmp_path, fake, rows=3)
        monkeypatch.setattr(results_module, "write_atomic", broken)
        rc = batch(wf, data, tmp_path / "out", [fake.url])
    assert rc == 1 and "could not be recorded" in capsys.readouterr().err


def test_non_image_reference_is_refused_before_upload_and_not_retried(tmp_path):
    with FakeComfy() as fake:
        wf, data = edit_setup(tmp_path, fake, rows=2)
        (tmp_path / "img" / "notes.txt").write_text("hello, not a picture\n")
        data.write_text(data.read_text().replace("img/a1.png", "img/notes.txt"))
        rc = batch(wf, data, tmp_path / "out", [fake.url], "--retries", "2")
        uploaded = list(fake.uploads)
    results = read_results(tmp_path / "out" / "results.csv")
    assert rc == 1 and [r["status"] for r in results] == ["ok", "error"]
    assert results[1]["error"].startswith("row 1 column 'image_url' (-> 10.image): 'notes.txt' is not an image")
    assert "expected a PNG, JPEG, WebP, GIF, BMP or TIFF file" in results[1]["error"]
    assert not [n for n in uploaded if "notes" in n] and len(fake.posted) == 1  # no upload, no retry


def test_missing_image_names_each_folder_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with FakeComfy() as fake:
        wf, data = edit_setup(tmp_path, fake, rows=1)
        (tmp_path / "img" / "a0.png").unlink()
        rc = batch(wf, data, tmp_path / "out", [fake.url])
    (result,) = read_results(tmp_path / "out" / "results.csv")
    assert rc == 1 and result["error"] == f"image file 'img/a0.png' not found (looked in {tmp_path / 'img'})"


def test_outputs_and_results_get_the_umask_mode(tmp_path):
    from gentor_headless import files

    old = os.umask(0o002)
    files._umask.cache_clear()
    try:
        with FakeComfy() as fake:
            wf, data = edit_setup(tmp_path, fake, rows=1)
            assert batch(wf, data, tmp_path / "out", [fake.url]) == 0
    finally:
        os.umask(old)
        files._umask.cache_clear()
    for name in ("0_0.png", "results.csv"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o664, name


def test_client_never_imports_ray_unless_asked(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gentor_headless.cli, gentor_headless.scheduler; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyarrow', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr

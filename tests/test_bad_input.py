"""Any bytes in a data file: every line becomes a record or a skip counted by reason, never an exception, and valid
records read back unchanged (the reader splits at b"\\n" only and decodes each line alone). Hypothesis drives the
reader and the Encoder with arbitrary lines, JSON values, conversations and image files."""

import io
import json
import logging
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image

from genllava_jax import errors
from genllava_jax.data import arrayrecord, pipeline, records
from genllava_jax.data.records import REASONS, TASKS, BadRecord, as_dict, read_records
from test_reliability import ask, encoder


def data_cfg(path, **kw):
    cfg = pipeline.default_data_config()
    cfg.update(path=str(path), max_len=40, image_size=16, num_patches=4, target_image_size=16, num_img_tokens=4,
               read_threads=1, max_image_pixels=1_000_000, **kw)
    return cfg


def grey16_png(values) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.asarray(values, np.uint16)).save(out, format="PNG")
    return out.getvalue()


def test_each_numbered_fault_is_one_counted_skip_and_the_rest_is_read(root, tok, caplog, monkeypatch):
    """Items 1-4 of issue 16, in one file: a non-UTF-8 line, U+2028/U+2029/U+0085 inside strings, 100k-deep JSON,
    a 5000-digit integer, an exception from deep inside the Encoder, 16-bit and 32-bit grey images; CRLF and a BOM."""
    grey = np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257  # 0 .. 65535: all white once clipped to 8 bits
    (root / "grey16.png").write_bytes(grey16_png(grey))
    Image.fromarray(np.full((8, 8), 1e4, np.float32)).save(root / "float_bright.tiff")  # no range to scale from
    separators = ask("good.png", question="a\u2028b\u2029c\u0085d What colour?", answer="red\u2028blue")
    lines = [
        "\ufeff" + json.dumps(ask("good.png")),  # BOM, then CRLF endings below
        json.dumps(ask("good.png", answer="caf\xe9"), ensure_ascii=False).encode("latin-1"),  # item 1: not UTF-8
        json.dumps(separators, ensure_ascii=False),  # item 2: one record, not three
        "[" * 100_000 + "]" * 100_000,  # item 3: RecursionError in json
        '{"conversations": [], "n": ' + "7" * 5000 + "}",  # item 3: int over Python's 4300-digit limit
        json.dumps(ask(question="BOOM")),  # item 3: any exception in the Encoder (raised below)
        json.dumps(ask("grey16.png")),  # item 4: 16-bit grey, scaled to 8 bits
        json.dumps(ask("float_bright.tiff")),  # item 4: 32-bit float grey over 255: skipped, not clipped
        "",  # blank lines are no records
        json.dumps(ask("good.png", answer="last")),
    ]
    path = root / "faults.jsonl"
    path.write_bytes(b"\r\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\r\n")

    real_encode = pipeline.encode_conversation

    def encode_or_boom(tokenizer, ids, turns, **kw):
        if any("BOOM" in u for u, _ in turns):
            raise ZeroDivisionError("a case no check foresaw")
        return real_encode(tokenizer, ids, turns, **kw)

    monkeypatch.setattr(pipeline, "encode_conversation", encode_or_boom)
    monkeypatch.setattr(records, "_logged", records.collections.Counter())
    caplog.set_level(logging.WARNING)
    it, info = pipeline.make_dataset(data_cfg(path), tok, global_batch=4, seed=0, train=False)
    batches = list(it)
    assert dict(info.skipped) == {"not_utf8": 1, "malformed": 2, "encode_error": 1, "bad_image_mode": 1}
    assert info.counts.read == 9 and info.num_records == {str(path): 9}
    kept = [(b, i) for b in batches for i in range(4) if b["attention_mask"][i].any()]
    assert len(kept) == 4  # the BOM line, the separators, the 16-bit image, the last
    # item 2: the record came through whole, separators included
    assert as_dict(read_records(path)[2][1]) == separators
    # item 4: the 16-bit image is its 8-bit scaling, not white
    image = records.load_image(str(root / "grey16.png"))
    np.testing.assert_array_equal(np.asarray(image)[..., 0], np.round(grey / 257))
    assert kept[2][0]["has_image"][kept[2][1]] and np.asarray(image).min() == 0
    # each skip named by file and line (1-based) in one log line
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for line, reason in ((2, "not_utf8"), (4, "malformed: RecursionError"), (5, "malformed: ValueError"),
                         (6, "encode_error: ZeroDivisionError: a case no check foresaw"), (8, "bad_image_mode")):
        assert f"data: skipped {path} line {line}: {reason}" in logged, (line, logged)
    assert "Traceback" not in logged


RECORD_FAULTS = [  # (record, the reason it is skipped under)
    ({"conversations": [{"from": "human", "value": "Hi"}]}, "no_assistant"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}, "bad_turns"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                        {"from": "gpt", "value": "c"}]}, "bad_turns"),
    (ask(task="dance"), "bad_task"),
    (ask("good.png", target_image="good.png"), "bad_task"),  # a target the i2t task never generates
    (ask("good.png", question="<image> and <image>?"), "too_many_images"),
    (ask(question="<image> what?"), "missing_image"),
    ({"conversations": "hi"}, "malformed"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]}, "malformed"),
    (ask("good.png", caption=["not", "text"]), "malformed"),
    (ask(image=7), "malformed"),
    ([1, 2], "malformed"),
]


@pytest.mark.parametrize("record,reason", RECORD_FAULTS, ids=[f"{r}-{i}" for i, (_, r) in enumerate(RECORD_FAULTS)])
def test_records_of_the_wrong_shape_are_skipped_by_reason(root, tok, record, reason):
    with pytest.raises(BadRecord) as e:
        encoder(tok, root).encode(json.dumps(record).encode())
    assert e.value.reason == reason, e.value
    assert encoder(tok, root)((1, json.dumps(record).encode())) == {"skip": reason}


def test_a_json_list_file_that_does_not_parse_is_one_line_naming_it(tmp_path):
    for name, data in (("latin.json", '[{"a": "caf\xe9"}]'.encode("latin-1")), ("deep.json", b"[" * 100_000),
                       ("cut.json", b'[{"conversations": ')):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(errors.BadValue, match=rf"{name}: not a JSON list of records .*write it as JSONL"):
            read_records(tmp_path / name)


def test_skips_are_logged_once_per_reason_then_only_counted(root, tok, caplog, monkeypatch):
    monkeypatch.setattr(records, "_logged", records.collections.Counter())
    path = root / "many_bad.jsonl"
    path.write_text("{bad\n" * 10 + json.dumps(ask("good.png")) + "\n")
    caplog.set_level(logging.WARNING)
    it, info = pipeline.make_dataset(data_cfg(path), tok, global_batch=4, seed=0, train=False)
    list(it)
    assert info.skipped == {"malformed": 10}
    lines = [r.getMessage() for r in caplog.records if "data: skipped" in r.getMessage()]
    assert len(lines) == records.LOG_FIRST and "later 'malformed' skips are only counted" in lines[-1]


def test_arrayrecord_entries_of_any_bytes_are_skips(root, tok, tmp_path, caplog, monkeypatch):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp_path / "bad.arrayrecord"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    good = arrayrecord.pack(arrayrecord.embed(ask("good.png"), root))
    for entry in (b"", b"\xc1", arrayrecord.pack([1, 2]), arrayrecord.pack({"conversations": "x"}), good[:-3],
                  b"\xd9\x02\xff\xfe", arrayrecord.pack({"a": 1})[:1] + b"\xdc" * 3, good):
        writer.write(entry)
    writer.close()
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(records, "_logged", records.collections.Counter())  # earlier tests' skips were logged
    it, info = pipeline.make_dataset(data_cfg(path), tok, global_batch=4, seed=0, train=False)
    rows = sum(int(b["attention_mask"].any(1).sum()) for b in it)
    assert rows == 1 and sum(info.skipped.values()) == 7 and set(info.skipped) <= {"malformed", "not_utf8"}
    assert f"{path} record 0: malformed" in "\n".join(r.getMessage() for r in caplog.records)


def test_arrayrecord_writer_skips_what_msgpack_cannot_hold(root, tmp_path):
    src = root / "for_ar.jsonl"
    src.write_text("\n".join([json.dumps(ask("good.png", meta=2**70)), json.dumps(ask("good.png")), "{x"]) + "\n")
    counts = arrayrecord.write(src, tmp_path / "out.arrayrecord")
    assert counts == {"written": 1, "encode_error": 1, "malformed": 1}


# ---------------------------------------------------------------------------------------------------------------
# Property: arbitrary lines, JSON values, conversations and image files


_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6)
_json = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                           max_size=3), max_leaves=6)
# text with what tends to break readers: line and paragraph separators, NEL, CR, BOM, NUL, RTL marks, emoji
_odd = st.sampled_from(["\u2028", "\u2029", "\u0085", "\r", "\r\n", "\ufeff", "\x00", "\u200f", "\U0001F600", "\\n",
                        "<image>", "[SOI]", "</s>", "\n"])
_text = st.one_of(st.text(max_size=12), st.text(max_size=12),
                  st.lists(st.text(max_size=6) | _odd, max_size=4).map("".join))
_pairs = st.lists(st.tuples(st.sampled_from(["human", "user"]), _text, st.sampled_from(["gpt", "assistant"]), _text),
                  min_size=1, max_size=3).map(
    lambda ts: [t for u, q, a, r in ts for t in ({"from": u, "value": q}, {"from": a, "value": r})])
_conversation = st.one_of(_pairs, _pairs, _pairs, st.lists(st.fixed_dictionaries({"from": _json | _text,
                                                                                 "value": _json | _text}), max_size=3))


@st.composite
def _image_file(draw):
    """The name of a new file in the data root: an image of any mode, size and format, or broken bytes."""
    mode = draw(st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"]))
    w, h = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode in ("I;16", "I", "F"):  # grey of the mode's own range
        top = {"I;16": 65535, "I": 2**20, "F": draw(st.sampled_from([1.0, 255.0, 1e6]))}[mode]
        grey = np.random.default_rng(seed).uniform(0, top, (h, w))
        image = Image.fromarray(grey.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    else:
        image = image.convert(mode)
    fmt = draw(st.sampled_from({"CMYK": ["TIFF", "JPEG"], "I": ["TIFF", "PNG"], "F": ["TIFF"],
                                "YCbCr": ["JPEG"], "I;16": ["PNG", "TIFF"]}.get(mode, ["PNG", "GIF", "BMP", "TIFF",
                                                                                       "WEBP"])))
    out = io.BytesIO()
    try:
        image.save(out, format=fmt)
    except (OSError, ValueError, KeyError):  # a mode the format cannot hold: random bytes instead
        out = io.BytesIO(np.random.default_rng(seed).bytes(40))
    data = out.getvalue()
    cut = draw(st.sampled_from([None, None, None, 0, 8, len(data) // 2, -1]))
    data = data if cut is None else data[:cut]
    if draw(st.booleans()) and len(data) > 20:  # a flipped byte, checked by PNG's CRC, not by BMP or TIFF
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]
    name = f"h/{uuid.uuid4().hex}.{fmt.lower()}"
    return name, data


@st.composite
def _record(draw):
    task = draw(st.sampled_from([*TASKS, None]))
    r = {"conversations": draw(_conversation)}
    if task is not None:
        r["task"] = task
    files = {}
    for key, used in (("image", ("i2t", "edit")), ("target_image", ("t2i", "edit"))):
        if task in used or (task is None and draw(st.booleans())):
            name, data = draw(_image_file())
            r[key], files[name] = name, data
    for key in ("caption", "meta", "id"):
        if draw(st.booleans()):
            r[key] = draw(_json | _text)
    return r, files


def _line(record: dict) -> st.SearchStrategy:
    """A record's JSON line, written as people write them, or damaged."""
    text = json.dumps(record, ensure_ascii=False)
    good = [text.encode(), json.dumps(record).encode(), text.encode() + b"\r", b"\xef\xbb\xbf" + text.encode()]
    return st.sampled_from(good * 3 + [text.encode()[:len(text) // 2], text.encode("utf-16"),
                                       text.encode("latin-1", "replace")])


_junk = st.binary(max_size=40) | st.sampled_from([b"[" * 5000, b'{"a": ' + b"9" * 5000 + b"}", b"\xff\xfe", b"null",
                                                  b'"\\ud800"', b"[]", b"{}", b"\x00"]) | _json.map(
    lambda v: json.dumps(v).encode())


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), max_len=st.sampled_from([12, 64, 64]))
def test_any_lines_give_records_or_counted_skips_and_valid_records_round_trip(root, tok, data, max_len):
    made = data.draw(st.lists(_record(), min_size=1, max_size=3))
    lines = [data.draw(st.one_of(_line(r), _line(r), _line(r), _junk)) for r, _ in made]
    (root / "h").mkdir(exist_ok=True)
    for _, files in made:
        for name, content in files.items():
            (root / name).write_bytes(content)
    path = root / f"h/{uuid.uuid4().hex}.jsonl"
    path.write_bytes(b"\n".join(lines))
    enc = encoder(tok, root, max_len=max_len)
    for position, raw in read_records(path):  # never raises, whatever the bytes
        try:
            ex, _ = enc.encode(raw)
        except BadRecord as e:  # the only way a record fails: a skip with its reason, never encode_error
            assert e.reason in REASONS and e.reason != "encode_error"
            event(e.reason)
            continue
        event("example")
        assert np.isfinite(ex["image"]).all() and np.abs(ex["target_image"]).max() <= 1 + 1e-6
        assert enc((position, raw)).keys() == {*ex, "_fixed"}
    # each record as written (ensure_ascii=False, separators and all) reads back equal, and encodes the same
    path.write_bytes("\n".join(json.dumps(r, ensure_ascii=False) for r, _ in made).encode())
    back = read_records(path)
    assert [as_dict(raw) for _, raw in back] == [r for r, _ in made]
    for (_, raw), (r, _) in zip(back, made):
        a, b = enc(raw), enc(r)
        event(f"as written: {a.get('skip', 'example')}")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a if k != "_fixed")


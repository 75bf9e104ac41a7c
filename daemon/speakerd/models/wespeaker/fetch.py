"""Download WeSpeaker's official ResNet34-LM checkpoint and convert it into a bundle.

The archive is the "Checkpoint (pt)" link for VoxCeleb ResNet34_LM in wenet-e2e/wespeaker
``docs/pretrained.md``: ``voxceleb_resnet34_LM.zip``, one folder holding ``avg_model.pt`` (averaged
state_dict with the loss head ``projection.weight``) and ``config.yaml`` (WeSpeaker's own hub
flattens that folder on unzip). Downloads resume from a ``.part`` file with an HTTP Range request,
so a dropped connection or a restarted command does not start again from zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import shutil
import socket
import urllib.error
import urllib.request
import zipfile
from http.client import HTTPException
from pathlib import Path
from typing import TYPE_CHECKING

from ...bundle import ModelBundle, models_root, sha256_file, write_manifest
from ...errors import SpeakerdError

if TYPE_CHECKING:
    from tqdm import tqdm

logger = logging.getLogger(__name__)

OFFICIAL_URL = "https://wenet.org.cn/downloads?models=wespeaker&version=voxceleb_resnet34_LM.zip"
"""docs/pretrained.md, VoxCeleb / ResNet34_LM / Checkpoint (pt)."""
MIRROR_URL = "https://wespeaker-1256283475.cos.ap-shanghai.myqcloud.com/models/voxceleb/voxceleb_resnet34_LM.zip"
"""The object-store link docs/pretrained.md gave for the same archive until April 2024."""
DOCS_URL = "https://github.com/wenet-e2e/wespeaker/blob/master/docs/pretrained.md"
EXPECTED_SHA256: str | None = None
"""Not pinned: the archive could not be fetched where this was written. Pass ``sha256`` to verify;
the hash actually downloaded is logged and recorded in the manifest either way."""
ARCHIVE_NAME = "voxceleb_resnet34_LM.zip"
CHECKPOINT_DIR = "checkpoint"
CHUNK_BYTES = 1 << 16
MAX_ATTEMPTS = 4
TIMEOUT_S = 30.0
USER_AGENT = "speakerd-fetch/1"


class DownloadError(SpeakerdError):
    """The checkpoint could not be downloaded or is not what was expected."""


def fetch_wespeaker(
    out_dir: Path,
    *,
    url: str = OFFICIAL_URL,
    sha256: str | None = EXPECTED_SHA256,
    progress: bool = True,
    coreml: bool = True,
    timeout_s: float = TIMEOUT_S,
) -> ModelBundle:
    """Download (resumably), verify, unpack and convert the official checkpoint into ``out_dir``."""
    from .convert import convert_wespeaker

    out_dir = Path(out_dir).expanduser()
    work = out_dir / CHECKPOINT_DIR
    archive = download(url, work / ARCHIVE_NAME, sha256=sha256, progress=progress, timeout_s=timeout_s)
    archive_sha = sha256_file(archive)
    if sha256 is None:
        logger.warning("no checksum pinned for %s; downloaded sha256 %s (recorded in the manifest)", url, archive_sha)
    checkpoint = unpack(archive, work / "unpacked")
    bundle = convert_wespeaker(checkpoint, out_dir, progress=progress, coreml=coreml)
    bundle = dataclasses.replace(bundle, source={**bundle.source, "url": url, "archive_sha256": archive_sha})
    write_manifest(bundle)
    archive.unlink()  # the unpacked folder stays, for re-conversion without a download
    return bundle


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    progress: bool = True,
    timeout_s: float = TIMEOUT_S,
    max_attempts: int = MAX_ATTEMPTS,
) -> Path:
    """``url`` -> ``dest`` through ``dest.part``, resuming with Range after a drop; checksum last."""
    from tqdm import tqdm

    if dest.is_file() and (sha256 is None or sha256_file(dest) == sha256):
        logger.info("%s already downloaded", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    total: int | None = None
    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress) as bar:
        for attempt in range(1, max_attempts + 1):
            have = part.stat().st_size if part.exists() else 0
            if total is not None and have >= total:
                break
            try:
                total = _fetch_into(url, part, have, timeout_s, bar)
            except _Retry as exc:
                logger.warning("download of %s interrupted (%s); resuming (attempt %d/%d)", url, exc, attempt, max_attempts)
                continue
            size = part.stat().st_size
            if total is None or size >= total:
                break
            logger.warning("connection closed at %d of %d bytes; resuming (attempt %d/%d)", size, total, attempt, max_attempts)
        else:
            raise DownloadError(f"download of {url} kept failing after {max_attempts} attempts; run the command again to resume")
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"download of {url} incomplete ({size} of {total} bytes); run the command again to resume")
    if sha256 is not None:
        got = sha256_file(part)
        if got != sha256.lower():
            part.unlink()
            raise DownloadError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}; the file was removed")
    part.replace(dest)
    return dest


class _Retry(Exception):
    """A transient failure after the connection was made: resume from what is on disk."""


def _fetch_into(url: str, part: Path, have: int, timeout_s: float, bar: tqdm) -> int | None:
    """One request; appends to ``part``; returns the full size if the server says it."""
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left past what we hold: the .part is complete
            return have
        raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"downloading the WeSpeaker checkpoint needs internet access, and {url} could not be reached "
            f"({reason}). Without internet: get {ARCHIVE_NAME} on another machine (links in {DOCS_URL}), "
            f"unzip it, and run `speakerd models convert wespeaker --checkpoint DIR` on the folder holding "
            f"avg_model.pt and config.yaml (pyannote's pytorch_model.bin works too)."
        ) from None
    with response:
        if response.status == 206:
            total = _total_from_content_range(response.headers.get("Content-Range"))
            mode = "ab"
        else:  # 200: the server ignored Range (or there was none); start from zero
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            mode, have = "wb", 0
        bar.reset(total=total)
        bar.update(have)
        try:
            with open(part, mode) as fh:
                while block := response.read(CHUNK_BYTES):
                    fh.write(block)
                    bar.update(len(block))
        except (OSError, HTTPException, socket.timeout) as exc:
            raise _Retry(exc) from None
    return total


def _total_from_content_range(value: str | None) -> int | None:
    match = re.fullmatch(r"bytes \d+-\d+/(\d+)", (value or "").strip())
    return int(match.group(1)) if match else None


def unpack(archive: Path, target: Path) -> Path:
    """Extract the zip (refusing paths outside ``target``); return the folder with avg_model.pt."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    root = target.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if not (root / member).resolve().is_relative_to(root):
                    raise DownloadError(f"{archive}: refusing archive member outside the target: {member}")
            zf.extractall(target)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{archive} is not a zip archive ({exc}); delete it and download again") from None
    found = sorted(p.parent for p in target.rglob("avg_model.pt") if (p.parent / "config.yaml").is_file())
    if not found:
        raise DownloadError(f"{archive} holds no folder with avg_model.pt and config.yaml")
    return found[0]


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of a ``speakerd models fetch wespeaker`` command, should the CLI offer one."""
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="bundle folder (default: <models>/wespeaker-resnet34)")
    parser.add_argument("--url", default=OFFICIAL_URL, help="archive URL (default: WeSpeaker's official link)")
    parser.add_argument("--sha256", default=EXPECTED_SHA256, help="expected sha256 of the archive")
    parser.add_argument("--no-coreml", action="store_true", help="do not build the CoreML package")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main_fetch(args: argparse.Namespace) -> int:
    from .convert import BUNDLE_NAME

    out = args.out if args.out is not None else models_root() / BUNDLE_NAME
    bundle = fetch_wespeaker(out, url=args.url, sha256=args.sha256, progress=not args.no_progress, coreml=not args.no_coreml)
    logger.info("model %s ready in %s", bundle.name, bundle.path)
    return 0

"""Content-addressed assets: the source folders that jobs and functions run.

``code/`` becomes ``sourcedir.tar.gz`` (the layout SageMaker framework
containers unpack) and ``lambda/`` becomes ``lambda.zip``. Archives are built
byte-for-byte reproducibly (sorted entries, fixed timestamps and owners), and
their S3 key carries the SHA-256 of their bytes, so an unchanged folder maps to
the same key and an upload can be skipped when the key exists.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.files import write_atomically
from pipeline.settings import Settings

FIXED_MTIME = 315532800  # 1980-01-01, the earliest time a zip entry can carry
IGNORED_PARTS = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints"}
IGNORED_SUFFIXES = {".pyc", ".pyo"}
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Asset:
    name: str
    source: str  # folder relative to the source tree
    filename: str
    sha256: str
    s3_uri: str
    files: tuple[str, ...]
    data: bytes

    @property
    def key(self) -> str:
        return self.s3_uri.split("/", 3)[3]

    def manifest_entry(self) -> dict[str, object]:
        return {
            "name": self.name,
            "source": self.source,
            "filename": self.filename,
            "sha256": self.sha256,
            "size": len(self.data),
            "s3_uri": self.s3_uri,
            "files": list(self.files),
        }


def source_files(folder: Path) -> list[Path]:
    """Files shipped from ``folder``: everything but caches and hidden files, sorted."""
    if not folder.is_dir():
        raise FileNotFoundError(f"asset folder {folder} does not exist")
    chosen = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or path.suffix in IGNORED_SUFFIXES:
            continue
        if any(part in IGNORED_PARTS or part.startswith(".") for part in relative.parts):
            continue
        chosen.append(path)
    if not chosen:
        raise FileNotFoundError(f"asset folder {folder} has no files to ship")
    return chosen


def _mode(path: Path) -> int:
    return 0o755 if path.stat().st_mode & 0o111 else 0o644


def tarball(folder: Path) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in source_files(folder):
            info = tarfile.TarInfo(path.relative_to(folder).as_posix())
            data = path.read_bytes()
            info.size, info.mtime, info.mode = len(data), FIXED_MTIME, _mode(path)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)


def zipball(folder: Path) -> bytes:
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in source_files(folder):
            info = zipfile.ZipInfo(path.relative_to(folder).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = _mode(path) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return raw.getvalue()


def build_asset(settings: Settings, name: str, source: str, filename: str) -> Asset:
    folder = settings.source_dir / source
    data = tarball(folder) if filename.endswith(".tar.gz") else zipball(folder)
    digest = hashlib.sha256(data).hexdigest()
    files = tuple(p.relative_to(folder).as_posix() for p in source_files(folder))
    return Asset(name, source, filename, digest, settings.s3_uri("assets", name, digest[:16], filename), files, data)


@dataclass(frozen=True)
class Assets:
    code: Asset
    lambdas: Asset

    def __iter__(self):
        return iter((self.code, self.lambdas))

    def manifest(self) -> dict[str, object]:
        return {"version": MANIFEST_VERSION, "assets": [asset.manifest_entry() for asset in self]}

    def write(self, build_dir: Path) -> Path:
        """Write the archives under ``build_dir/assets`` and the manifest beside the definition."""
        for asset in self:
            target = build_dir / "assets" / asset.sha256[:16] / asset.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists() or target.read_bytes() != asset.data:
                write_atomically(target, asset.data)
        path = build_dir / "assets.json"
        write_atomically(path, (json.dumps(self.manifest(), indent=2, sort_keys=True) + "\n").encode())
        return path


def build_assets(settings: Settings) -> Assets:
    return Assets(
        code=build_asset(settings, "code", "code", "sourcedir.tar.gz"),
        lambdas=build_asset(settings, "lambda", "lambda", "lambda.zip"),
    )


class ArtifactError(ValueError):
    """A built definition or its assets cannot be published as they are; the message says why and what to do."""


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: dogbreed synth writes it beside the definition; "
                            "keep the two (and build/assets/) together") from None
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{path} is not JSON ({error}): run dogbreed synth again") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION or not isinstance(manifest.get("assets"), list):
        raise ArtifactError(f"{path} is not an asset manifest of version {MANIFEST_VERSION}: run dogbreed synth again")
    return manifest


def archive_members(filename: str, data: bytes) -> list[str]:
    if filename.endswith(".tar.gz"):
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            return sorted(member.name for member in tar.getmembers() if member.isfile())
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return sorted(info.filename for info in archive.infolist() if not info.is_dir())


def asset_from_manifest(build_dir: Path, entry: dict, manifest_path: Path) -> Asset:
    """The archive ``entry`` names, read from ``build_dir/assets``, refused unless its bytes are the manifest's."""
    try:
        name, filename, sha256, s3_uri = entry["name"], entry["filename"], entry["sha256"], entry["s3_uri"]
    except (KeyError, TypeError):
        raise ArtifactError(f"{manifest_path}: an asset entry lacks name, filename, sha256 or s3_uri: run dogbreed synth again") from None
    path = build_dir / "assets" / sha256[:16] / filename
    try:
        data = path.read_bytes()
    except OSError:
        raise ArtifactError(f"asset {name}: {path} is missing; {manifest_path} lists it: run dogbreed synth again") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ArtifactError(f"asset {name}: {path} has changed since synth (SHA-256 {digest[:16]}..., the manifest says "
                            f"{sha256[:16]}...): run dogbreed synth again, then test and publish what it writes")
    files = tuple(entry.get("files", ()))
    if sorted(files) != archive_members(filename, data):
        raise ArtifactError(f"asset {name}: {path} does not hold the files {manifest_path} lists: run dogbreed synth again")
    return Asset(name, entry.get("source", name), filename, sha256, s3_uri, files, data)


def assets_from_manifest(manifest_path: Path) -> Assets:
    """The code and Lambda archives that ``dogbreed synth`` wrote beside a definition, checked against its manifest."""
    manifest = read_manifest(manifest_path)
    assets = {entry.get("name"): asset_from_manifest(manifest_path.parent, entry, manifest_path) for entry in manifest["assets"]}
    missing = {"code", "lambda"} - set(assets)
    if missing:
        raise ArtifactError(f"{manifest_path} lists no {' or '.join(sorted(missing))} asset: run dogbreed synth again")
    return Assets(code=assets["code"], lambdas=assets["lambda"])


def stale_sources(assets: Assets, settings: Settings) -> list[str]:
    """The source folders whose archive today differs from the one in the manifest (edited since synth)."""
    stale = []
    for asset in assets:
        folder = settings.source_dir / asset.source
        if folder.is_dir():
            current = build_asset(settings, asset.name, asset.source, asset.filename)
            if current.sha256 != asset.sha256:
                stale.append(f"{asset.source}/ (its archive is {current.sha256[:16]} now, {asset.sha256[:16]} at synth)")
    return stale

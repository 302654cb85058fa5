"""Weights by name: an open_clip pretrained tag or an ``hf-hub:`` repo -> one local file.

Where the weights of a tag live is open_clip's data (``open_clip.pretrained.get_pretrained_cfg``:
an ``hf_hub`` "org/repo/[file]" entry and/or a ``url``), as is the activation they were trained
with (``quick_gelu``). capnet looks in the caches first (the Hugging Face hub cache for hub
entries, open_clip's ``~/.cache/clip`` for url entries), downloads only when that fails and the
hub is not offline (``HF_HUB_OFFLINE=1``), and otherwise raises one line saying what to fetch and
where to put it. The cache roots and the offline switch are read from the environment at call
time (huggingface_hub reads them once, at import), so a run's environment always decides.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from capnet.errors import CheckpointError

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's hub names
OPEN_CLIP_CONFIG = "open_clip_config.json"  # model_cfg + preprocess_cfg of an hf-hub: repo
_TRUE = ("1", "on", "yes", "true")


@dataclass(frozen=True)
class RemoteWeights:
    """Where named weights live: a hub repo and file names to try, and/or a URL."""

    label: str  # what was asked for, for messages ("ViT-B-16 'openai'")
    repo_id: Optional[str] = None  # Hugging Face hub repo ("timm/vit_base_patch16_clip_224.openai")
    filenames: Tuple[str, ...] = ()  # file names in the repo, first found wins (safetensors first)
    url: Optional[str] = None  # direct download (OpenAI's release archives)
    pretrained_cfg: Optional[Dict[str, Any]] = None  # open_clip's entry (quick_gelu, mean, std, ...)

    def origin(self, path: Path) -> str:
        """Provenance string for the file ``path`` came from: ``hf-hub:repo/file`` or the URL."""
        if self.repo_id and path.name in self.filenames:
            return f"hf-hub:{self.repo_id}/{path.name}"
        return self.url or str(path)


def is_offline() -> bool:
    """Whether the hub must not be contacted: ``HF_HUB_OFFLINE`` now, or as huggingface_hub read it."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # no hub client: nothing can be downloaded from the hub anyway
        return True
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache huggingface_hub would use: HF_HUB_CACHE, HF_HOME/hub or ~/.cache."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def url_cache_dir() -> Path:
    """open_clip's download folder for url entries (``download_pretrained_from_url``'s default)."""
    return Path.home() / ".cache" / "clip"


def pretrained_tags(arch: str) -> List[str]:
    """The tags open_clip knows for ``arch`` (for error messages)."""
    import open_clip

    return list(open_clip.pretrained.list_pretrained_tags_by_model(arch))


def remote_for_tag(arch: str, tag: str) -> Optional[RemoteWeights]:
    """open_clip's pretrained entry for (arch, tag) as a RemoteWeights; None if there is none."""
    import open_clip

    cfg = open_clip.pretrained.get_pretrained_cfg(arch, tag)
    if not cfg or not (cfg.get("hf_hub") or cfg.get("url")):
        return None
    repo_id, filenames = None, ()
    if cfg.get("hf_hub"):
        # open_clip's convention: "org/repo/" -> default file names, "org/repo/file" -> that file
        repo_id, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" -> ("org/repo", "")
        filenames = (filename,) if filename else OPEN_CLIP_FILES
        if filename.endswith((".bin", ".pth")):  # open_clip prefers a safetensors twin when present
            filenames = (filename[:-4] + ".safetensors", filename)
    return RemoteWeights(f"{arch} '{tag}'", repo_id, filenames, cfg.get("url") or None, dict(cfg))


def remote_for_repo(repo_id: str, filenames: Tuple[str, ...] = OPEN_CLIP_FILES) -> RemoteWeights:
    """An ``hf-hub:org/repo`` (open_clip layout) as a RemoteWeights."""
    return RemoteWeights(f"hf-hub:{repo_id}", repo_id, filenames)


def cached_file(remote: RemoteWeights) -> Optional[Path]:
    """The first of ``remote``'s files already on disk (hub cache, then open_clip's url cache)."""
    if remote.repo_id:
        from huggingface_hub import try_to_load_from_cache

        for name in remote.filenames:
            hit = try_to_load_from_cache(remote.repo_id, name, cache_dir=str(hub_cache_dir()))
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
    if remote.url:
        path = url_cache_dir() / os.path.basename(remote.url)
        if path.is_file():
            return path
    return None


def fetch_instructions(remote: RemoteWeights) -> str:
    """Where to get ``remote`` and where to put it, as one sentence (no newlines)."""
    ways = []
    if remote.repo_id:
        ways.append(f"`hf download {remote.repo_id} {remote.filenames[0]}` on a machine with internet, then copy "
                    f"its hub cache folder models--{remote.repo_id.replace('/', '--')} into {hub_cache_dir()}")
    if remote.url:
        ways.append(f"download {remote.url} into {url_cache_dir()}")
    ways.append("or set model.weights=/path/to/the/file")
    return "; ".join(ways)


def _hub_download(repo_id: str, filename: str) -> str:
    """One hub download into the cache capnet reads (a seam: tests replace it)."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename, cache_dir=str(hub_cache_dir()), library_name="capnet")


def _url_download(url: str) -> str:
    """One url download into open_clip's cache, checked against the sha256 in OpenAI's URLs."""
    import open_clip

    return open_clip.pretrained.download_pretrained_from_url(url, cache_dir=str(url_cache_dir()))


def fetch(remote: RemoteWeights) -> Path:
    """A local file for ``remote``: cached, else downloaded, else a one-line CheckpointError."""
    hit = cached_file(remote)
    if hit is not None:
        return hit
    if is_offline():
        raise CheckpointError(
            f"weights {remote.label} are not cached and HF_HUB_OFFLINE is set; fetch them: {fetch_instructions(remote)}")
    errors: List[str] = []
    if remote.repo_id:
        from huggingface_hub.errors import EntryNotFoundError

        for name in remote.filenames:
            try:
                return Path(_hub_download(remote.repo_id, name))
            except EntryNotFoundError:
                errors.append(f"{remote.repo_id} has no {name}")
            except Exception as e:  # network, auth, disk: the message says which
                errors.append(f"{remote.repo_id}/{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                break
    if remote.url:
        try:
            return Path(_url_download(remote.url))
        except Exception as e:
            errors.append(f"{remote.url}: {type(e).__name__}: {e}")
    raise CheckpointError(f"cannot download weights {remote.label} ({'; '.join(errors)}); "
                          f"fetch them yourself: {fetch_instructions(remote)}")

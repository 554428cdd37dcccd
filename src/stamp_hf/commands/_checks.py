"""Checks of command-line arguments that need neither torch nor transformers, so that a mistake (a device name, a
missing folder, a folder given as an image, a busy port, a number out of range, an unreachable Hub) is one line
within a second, before the slow imports. Availability (is there a CUDA device?) is checked after torch loads.

The Hugging Face Hub: a repo id that is not in the local cache is fetched, so the Hub is probed once, with
HUB_TIMEOUT seconds to answer (huggingface_hub's HF_HUB_ETAG_TIMEOUT, 10 by default); when it does not answer, a
cached copy is used offline and an uncached one is a one-line error naming what was being fetched, instead of
huggingface_hub's retries (a minute and more with its back-off) and a traceback."""

import errno
import os
import re
import socket
from pathlib import Path

from ..cli import CommandError, one_line
from ..repo_ids import REPO_ID

# torch device types a user may name (availability is checked after torch loads); "cuda:1" style indices
DEVICE = re.compile(r"(cpu|cuda|mps|xpu|hpu|npu|mtia|meta)(:\d+)?")
HUB_OFFLINE_HINT = "set HF_HUB_OFFLINE=1 to use only cached files"


def hub_timeout() -> int:
    """Seconds the Hub has to answer (HF_HUB_ETAG_TIMEOUT, as huggingface_hub reads it)."""
    from huggingface_hub import constants

    return constants.HF_HUB_ETAG_TIMEOUT


def check_device(name: str | None) -> None:
    if name is not None and not DEVICE.fullmatch(name):
        raise CommandError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, mps, ...)")


def check_at_least(args, minimum, *names: str) -> None:
    """Each option in `names` (attribute names of `args`; None = not given) is at least `minimum`."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise CommandError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


def check_image(path: str) -> None:
    """An image argument: a URL (read later), or a file that exists and is not a folder."""
    if re.match(r"https?://", str(path)):
        return
    if Path(path).is_dir():
        raise CommandError(f"{path} is a folder, not an image file")
    if not Path(path).is_file():
        raise CommandError(f"{path}: no such image file")


def check_folder(path, option: str) -> Path:
    """A folder argument that must exist (a file where a folder is expected is named as such)."""
    path = Path(path)
    if path.is_file():
        raise CommandError(f"{option} {path} is a file; give a folder")
    if not path.is_dir():
        raise CommandError(f"{option} {path}: no such folder")
    return path


def check_exists(path, option: str, what: str) -> Path:
    """An input that may be a file or a folder (a dataset, a config file) and must exist."""
    path = Path(path)
    if not path.exists():
        raise CommandError(f"{option} {path}: no such {what}")
    return path


def check_output_folder(path, option: str) -> Path | None:
    """A folder the command writes into (made when missing); a file of that name is refused."""
    if path is None:
        return None
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CommandError(f"{option} {path} is a file; give a folder")
    if not path.exists() and not path.parent.is_dir():
        raise CommandError(f"{option} {path}: the folder {path.parent} does not exist")
    return path


def check_port(host: str, port: int, option: str = "--port") -> None:
    """A port in range that nothing listens on yet (checked by binding it, then letting it go)."""
    if not 0 < port < 65536:
        raise CommandError(f"{option} must be 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a closing socket is no obstacle
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise CommandError(f"{option} {port}: the port is in use on {host} (another server?); "
                                   f"stop it or pick another {option}") from None
            raise CommandError(f"{option} {port}: cannot serve on {host}:{port} ({one_line(error)})") from None


def check_source(value, option: str, what: str, file_suffixes: tuple = (), markers: tuple = ("config.json",)) -> None:
    """A checkpoint argument: a local folder with one of the `markers` files, a file ending in one of `file_suffixes`
    (a segment-anything .pth), or a Hub repo id that is cached or fetchable. `what` names it in messages ("model",
    "SAM model", "base model")."""
    text = str(value)
    path = Path(text).expanduser()
    if file_suffixes and text.endswith(file_suffixes):
        if path.is_dir():
            raise CommandError(f"{option} {text} is a folder; give the {what} file")
        if not path.is_file():
            raise CommandError(f"{option} {text}: no such file")
        return
    if path.is_file():
        raise CommandError(f"{option} {text} is a file; give the {what}'s folder (config.json, *.safetensors) or a "
                           "Hub repo id")
    if path.is_dir():
        if not any((path / marker).is_file() for marker in markers):
            raise CommandError(f"{option} {text}: the folder has no {' or '.join(markers)} (not a saved {what})")
        return
    if not REPO_ID.fullmatch(text):
        raise CommandError(f"{option} {text}: no such folder")
    check_hub_repo(text, option, what, markers)


def check_hub_repo(repo_id: str, option: str, what: str, markers: tuple = ("config.json",)) -> None:
    """A Hub repo id to load from: in the cache, or the Hub answers. With the Hub unreachable, a cached copy is used
    (this process goes offline, so nothing retries); an uncached one is an error naming it."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = any(isinstance(try_to_load_from_cache(repo_id, marker), str) for marker in markers)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise CommandError(f"{option} {repo_id}: no such folder, and the {what} {repo_id} is not in the Hugging "
                               "Face cache (HF_HUB_OFFLINE is set, so it cannot be downloaded)")
        return
    problem = hub_unreachable()
    if problem is None:
        return
    if cached:
        go_offline()
        return
    raise CommandError(f"{option} {repo_id}: no such folder, and cannot fetch the {what} {repo_id} from the Hugging "
                       f"Face Hub ({problem}); it is not in the local cache either")


_PROBED: dict = {}


def hub_unreachable() -> str | None:
    """None when the Hub answers (any HTTP status) within hub_timeout() seconds, else why not; probed once."""
    if "result" not in _PROBED:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        timeout = hub_timeout()
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            _PROBED["result"] = None
        except Exception as error:  # httpx's transport errors (DNS, refused, timeout); nothing was sent
            _PROBED["result"] = f"no answer from {constants.ENDPOINT}, {one_line(error)}; waited at most {timeout}s"
    return _PROBED["result"]


def check_hub_reachable(doing: str) -> None:
    """Before work that needs the Hub itself (a push): it answers, else one line saying what could not be done."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise CommandError(f"cannot {doing}: HF_HUB_OFFLINE is set")
    problem = hub_unreachable()
    if problem is not None:
        raise CommandError(f"cannot {doing}: the Hugging Face Hub is unreachable ({problem})")


def go_offline() -> None:
    """Cached files only from now on in this process (huggingface_hub and transformers read the flag per call)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True

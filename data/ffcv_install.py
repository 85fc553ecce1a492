"""Import ffcv, or say in one sentence how to install it.

ffcv ships as source only; building it needs OpenCV and libjpeg-turbo headers found by pkg-config,
so a plain ``pip install ffcv`` fails on a machine without them."""
from __future__ import annotations

from accel.errors import UserInputError

# The release pinned in requirements.txt (a test checks that the two agree).
FFCV_VERSION = "1.0.2"

INSTALL_HINT = (f"ffcv is not importable; install its build dependencies (Debian: apt-get install "
                f"libopencv-dev libturbojpeg0-dev pkg-config) and then pip install ffcv=={FFCV_VERSION} "
                "(bash run.sh does both).")


def require_ffcv():
    """Return the ``ffcv`` package, or raise the install sentence as a UserInputError."""
    import torch

    threads = torch.get_num_threads()
    try:
        import ffcv
        import ffcv.fields  # noqa: F401 - the compiled extension loads here
        import ffcv.loader  # noqa: F401
    except ImportError as exc:
        raise UserInputError(INSTALL_HINT) from exc
    finally:
        # Importing ffcv sets torch's thread count to 1 (its Compiler's default); keep the caller's.
        torch.set_num_threads(threads)
    return ffcv

"""Hints to the operating system about the memory of a load (Linux with glibc; elsewhere no-ops).

Both matter for CPU inference: decode streams every weight once per token, and
a load should peak at the final weights plus about one tensor.
"""
import ctypes
import functools

_MADV_HUGEPAGE = 14
_PAGE, _HUGE_PAGE = 4096, 2 << 20


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "madvise") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def ask_for_huge_pages(t):
    """Back a big CPU tensor with transparent huge pages where the kernel allows it (THP in "madvise"
    or "always" mode); call it before the pages are first written. 2 MiB pages spare decode the TLB
    misses of 4 KiB ones (native GEMV, one thread: 16.5 -> 29.9 GB/s)."""
    start = -(-t.data_ptr() // _PAGE) * _PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // _PAGE * _PAGE
    if _libc() is not None and end - start >= _HUGE_PAGE:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)


def return_free_heap():
    """Give the free pages inside the C heap back to the OS (malloc_trim). A tensor's staging copies
    (dequantized chunks, concatenations) are freed into the heap, where glibc keeps them resident:
    without this, ~25 MB of them stay in the process through a SmolLM2 load."""
    if _libc() is not None:
        _libc().malloc_trim(0)

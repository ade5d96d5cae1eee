# cython: language_level=3
"""Native twin of ``offscan._statwalk_py``: the identities of plain client paths, confined.

Same contract, same answers, same ``dirs`` afterwards (tests/test_statwalk.py checks both
against each other with Hypothesis). What it saves is the Python around one ``fstatat``: no
``os.stat_result`` (about twenty fields, three of them floats) and no per-path splitting,
joining and tuple building; the file's identity tuple is built from the ``struct stat``
directly. Any doubt returns None, and the caller's Python walk then refuses or reports the
path exactly as before: this module never refuses anything itself.
"""

from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memchr, memcpy
from libc.stdlib cimport malloc, free
from posix.types cimport dev_t, ino_t, mode_t, off_t
from posix.time cimport timespec

cdef extern from "<sys/stat.h>" nogil:
    ctypedef struct struct_stat "struct stat":
        dev_t st_dev
        ino_t st_ino
        mode_t st_mode
        off_t st_size
        timespec st_mtim
        timespec st_ctim
    int fstatat(int dirfd, const char *path, struct_stat *buf, int flags)
    bint S_ISREG(mode_t mode)

cdef extern from "<fcntl.h>" nogil:
    int openat(int dirfd, const char *path, int flags, ...)
    enum:
        O_RDONLY
        O_DIRECTORY
        O_NOFOLLOW
        O_CLOEXEC
        AT_SYMLINK_NOFOLLOW

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef extern from "Python.h":
    Py_ssize_t PyUnicode_FindChar(object s, Py_UCS4 ch, Py_ssize_t start, Py_ssize_t end,
                                  int direction) except -2

# as confine._DIR_FLAGS: a directory, never through a symlink
cdef int DIR_FLAGS = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC
cdef long long NS = 1000000000  # st_*_ns = seconds * 10**9 + nanoseconds, as os.stat


def identify_many(dict dirs, list relpaths, str source, type cls, int max_dirs):
    """``cls((source, dev, ino, size, mtime_ns, ctime_ns))`` (a tuple subclass, built as
    ``tuple.__new__`` builds it) of each plain path's regular
    file under ``dirs[""]``, or None (see ``offscan._statwalk_py.identify_many``)."""
    cdef list out = []
    for relpath in relpaths:
        if len(dirs) > max_dirs:  # before each path, exactly as the twin
            for key in [k for k in dirs if k]:
                close(dirs.pop(key))
        out.append(_one(dirs, relpath, source, cls))
    return out


cdef inline bint _plain(const char *b, Py_ssize_t n):
    """Non-empty, not absolute, no NUL, no empty/./.. component (UTF-8 multi-byte sequences
    never contain '/', '.' or NUL, so bytes decide what the twin decides on characters)."""
    cdef Py_ssize_t i = 0, start = 0, length
    if n == 0 or b[0] == b'/' or memchr(b, 0, n) != NULL:
        return False
    while True:
        i = start
        while i < n and b[i] != b'/':
            i += 1
        length = i - start
        if length == 0 or (b[start] == b'.' and (length == 1 or (length == 2 and b[start + 1] == b'.'))):
            return False
        if i == n:
            return True
        start = i + 1


cdef object _one(dict dirs, object relpath, str source, type cls):
    cdef Py_ssize_t n, slash, prev, byte_slash
    cdef const char *b
    cdef struct_stat st
    cdef int dirfd
    if type(relpath) is not str:
        return None
    try:
        b = PyUnicode_AsUTF8AndSize(relpath, &n)
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 form (the twin declines too)
        return None
    if not _plain(b, n):
        return None
    # the directory's key is the path before its last '/' ("" at the root)
    slash = PyUnicode_FindChar(relpath, u'/', 0, len(relpath), -1)
    key = relpath[:slash] if slash >= 0 else ""
    got = dirs.get(key)
    if got is not None:
        dirfd = got
    else:
        dirfd = _walk(dirs, <str>relpath, b, n)
        if dirfd < 0:
            return None
    byte_slash = n - 1
    while byte_slash >= 0 and b[byte_slash] != b'/':
        byte_slash -= 1
    # Holding the GIL, deliberately: this runs on the event loop, and a GIL released per
    # file may be kept by a busy pool thread for a whole switch interval (5 ms) per hit.
    if fstatat(dirfd, b + byte_slash + 1, &st, AT_SYMLINK_NOFOLLOW) != 0:
        return None
    if not S_ISREG(st.st_mode):
        return None
    return tuple.__new__(cls, (
        source,
        <unsigned long long>st.st_dev,
        <unsigned long long>st.st_ino,
        <long long>st.st_size,
        <long long>st.st_mtim.tv_sec * NS + st.st_mtim.tv_nsec,
        <long long>st.st_ctim.tv_sec * NS + st.st_ctim.tv_nsec,
    ))



cdef int _walk(dict dirs, str relpath, const char *b, Py_ssize_t n) except -2:
    """Open (and keep in ``dirs``) each directory of a plain ``relpath`` not yet there, one
    component at a time from the root; its descriptor, or -1 if one failed to open."""
    cdef char *copy = <char *>malloc(n + 1)  # the components NUL-terminated in place
    cdef Py_ssize_t i = 0, start = 0, chars = -1
    cdef int dirfd = dirs[""], fd
    if copy == NULL:
        raise MemoryError()
    memcpy(copy, b, n + 1)
    try:
        while True:
            i = start
            while i < n and copy[i] != b'/':
                i += 1
            if i == n:  # the last component is the file
                return dirfd
            copy[i] = 0
            chars = PyUnicode_FindChar(relpath, u'/', chars + 1, len(relpath), 1)
            key = relpath[:chars]
            got = dirs.get(key)
            if got is None:
                fd = openat(dirfd, copy + start, DIR_FLAGS)
                if fd < 0:
                    return -1
                try:
                    dirs[key] = fd
                except BaseException:
                    close(fd)
                    raise
                dirfd = fd
            else:
                dirfd = got
            start = i + 1
    finally:
        free(copy)

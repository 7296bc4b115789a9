"""The Windows spawn start strategy: present so the package lists the same modules as the
stdlib's, importable nowhere.

The stdlib ships ``multiprocessing/popen_spawn_win32.py`` on every platform, and importing it
anywhere but Windows fails (it needs ``msvcrt`` and ``_winapi``). ferroproc runs on Linux
only, so importing this module always raises `ImportError`, as the stdlib's does here; code
that lists the package's modules (CPython's own ``test_import``) finds it where it expects.
"""

raise ImportError(
    "ferroproc.popen_spawn_win32 is the Windows spawn strategy; ferroproc runs on Linux only "
    "(the stdlib's module cannot be imported outside Windows either)"
)

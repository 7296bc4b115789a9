"""The per-start-method test module of the compat harness.

Builds the ``WithProcessesTest*``/``WithThreadsTest*``/``WithManagerTest*`` classes and the
top-level ``Test*`` classes from the interpreter's own, unmodified
``test/_test_multiprocessing.py`` -- the same thing CPython's ``test_multiprocessing_<method>``
wrapper modules do. It lives on the harness ``PYTHONPATH`` so spawn and forkserver children can
import it by name when they unpickle ``<class>._test_xxx`` targets.
"""

import os

from test import _test_multiprocessing as _suite_source

START_METHOD = os.environ.get("FERROPROC_COMPAT_START_METHOD", "fork")

_suite_source.install_tests_in_module_dict(globals(), START_METHOD)

_original_setUpModule = setUpModule  # noqa: F821 - defined by install_tests_in_module_dict


def setUpModule():
    """The suite's own setUpModule; its ``RLock()`` platform probe may use the stdlib.

    setUpModule creates one ``multiprocessing.RLock()`` only to learn whether sem_open works on
    this platform. While ferroproc has no RLock, that probe is allowed to use the stdlib; every
    other call stays on ferroproc.
    """
    import _ferroproc_substitute

    if _ferroproc_substitute.is_installed():
        with _ferroproc_substitute.allow_stdlib_probe():
            _original_setUpModule()
    else:
        _original_setUpModule()

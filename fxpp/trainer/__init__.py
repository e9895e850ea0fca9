"""The trainer room: the ``fxpp run`` application, built on the runtime library.

``cli``: the command line, ``fxpp plan``, ``fxpp run`` and ``fxpp export`` (also ``python -m fxpp``).
``train``: the ``fxpp run`` job (``RunConfig``, one rank's training loop, the parity check).
``run_state``: a run's save directory (``--save-dir``, ``--resume``, ``--keep-last``, ``fxpp export``).
``step_files``: a save directory's steps and their files: names, listing, checksums, fingerprints.
``data``: ``--data`` files, tokenized and packed into batches.
``corpus``: the tokenized corpus: ``--data`` tokenized once with ``datasets`` into a cache every rank memory-maps.
``models``: where the command line gets models (presets from ``fxpp.presets``, directories, config files).
``launch``: running a function on local ranks with a process group (also the tests' and benchmarks').

It imports the library (``fxpp.runtime``, ``fxpp.pipeline``) and the presets; nothing in the
library imports it, and it does not import the testing room.
"""

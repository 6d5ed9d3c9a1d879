"""Lightning glue below the modules: checkpoint I/O, callbacks and the data modules.

Imports the vocabulary, sampling and the plugins; never the modules or the CLI.
"""

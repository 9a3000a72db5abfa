"""Every detector's task, one module each (orientation, inversion, flip, view, pediatric, atypical), and their helpers.

A module here registers its task with :func:`filmgate_training.tasks.register` when imported;
:func:`filmgate_training.tasks.get_task` imports every module of this package (``pkgutil``) the first time a task is
looked up, so adding a detector is adding a file here: no list is kept by hand.
"""

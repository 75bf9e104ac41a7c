"""CoreML packages for the Neural Engine: conversion, a static check and a numpy reference executor.

Submodules are imported where needed: ``convert`` needs torch and coremltools (model building only),
``check`` and ``mil_exec`` need only numpy and coremltools' protobuf classes. ``speakerd run`` never
imports this package except ``check`` through the CoreML backend on macOS.
"""

"""Applications built on the gateway: programs that use the service, never parts of it.

An app drives the service from outside, as a site's own tooling would: it
starts a :class:`gateway.service.Gateway`, talks DICOM to it and reads its
index, but the service runs the same without it. Here:

* :mod:`gateway.apps.demo`: ``aigw demo``, the whole path from a synthetic
  scanner to a PACS on one machine, with a report;
* :mod:`gateway.apps.viewer`: the viewer harness (Orthanc, OHIF, headless
  Chromium) that the demo and the tests show results in.

The dependency runs one way. Apps import the service; nothing in the service
imports an app, with one exception: :mod:`gateway.cli` imports the demo
inside the ``aigw demo`` command, when that command runs, so ``aigw serve``
never loads it. ``tests/test_layout.py`` checks the rule.
"""

"""fleetmem's test kit: a pytest plugin with real-server fixtures, and the conformance suite.

The plugin is registered through the ``pytest11`` entry point, so installing fleetmem with the
``test`` extra makes its fixtures available in any project.
"""

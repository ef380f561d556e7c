"""The application layer: the run manager and training jobs between the front ends and the hosts."""

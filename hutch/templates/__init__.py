"""Templates: the root file systems instances boot from, and their defaults.

- `model.py`: what a template is (`Template`, `RootFS`: the layers an instance mounts).
- `store.py`: where templates and their layers live on disk (`TemplateStore`).
- `debian.py`: a base layer built from a Debian suite with mmdebstrap.
- `oci.py`: a base layer unpacked from an OCI image (skopeo + umoci).
"""

"""The name `hf_longattn.storage` had before hf_longattn 0.3 (it lives below every module that writes files now)."""

from ..storage import (  # noqa: F401
    atomic_folder,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    json_sha256,
    read_json,
    remove_stale_temporaries,
    replace_folder,
    sha256_file,
    storage_errors,
    temporary_name,
)

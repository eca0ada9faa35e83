"""Raw videos (UCF101, HMDB51, synthetic) -> HDF5 shards of RGB JPEG frames and quantised flow."""

"""The versioned instance-segmentation step."""

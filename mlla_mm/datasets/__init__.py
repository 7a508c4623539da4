"""Generated toy datasets in COCO and ADE20K layout."""

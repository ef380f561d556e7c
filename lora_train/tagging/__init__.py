"""Dataset tagging: the tag store with undo, WD14 tags and BLIP captions."""

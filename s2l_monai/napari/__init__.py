"""napari plugin of s2l-monai: scribble, train and segment in one dock widget (``pip install s2l-monai[napari]``)."""

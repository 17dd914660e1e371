"""Objects: the physical encoding of content-addressed data (see ``encoding``)."""

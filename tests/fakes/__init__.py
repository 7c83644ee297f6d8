"""Local servers speaking the cloud providers' wire protocols, with fault injection and recording."""

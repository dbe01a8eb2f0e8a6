"""Where input videos come from: listing and identifying inputs, their metadata captions, and the offline demo
corpus."""

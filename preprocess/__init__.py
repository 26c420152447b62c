"""satpipe preprocessing: datasets and annotations -> soft saliency maps -> WebDataset shards."""

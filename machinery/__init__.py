"""What the method uses but is not: the six pix2pixCC_*.py scripts beside this folder are the
method a researcher reads and edits; the machinery around it is here, one concern a module.
No module here imports a driver (pix2pixCC_Train, pix2pixCC_Test).

translation  a generator on images: load it for inference, one image whole or in tiles,
             every input of a dataset into its products (Test and training's validation)
whole_image  the whole-image pass: the traced forward, writing in place where the graph allows
tile_graph   what the tiled path computes: the network's forward traced and its calls sorted
tiles        exact tiled inference: convolutions over tiles with halos, stores, statistics
tile_memory  whole image or tiles: memory and disk estimates, the memory available (cgroups)
evaluation   metrics after binning, flux, the solar disk and its regions, the best iteration
outputs      output folders and their record (test_run.json): refusal and --overwrite
sharing      --export model and --export onnx
maps         sunpy maps from Python: a model file's generator on maps (load_model, translate)
products     generated data in the target's format and units, FITS header rules (no torch)
data_checks  checks of a whole dataset before training: sizes, NaN, limits, pairing by time
data_profile what a network was trained on, and warnings about data unlike it (no torch)
sdoml        SDOMLv2 zarr stores: frame times, headers, pairing by time, split, window reads
sdoml_data   SDOML stores as a run's data: StoreDataset of their pairs, the run's pair list
files        errors and files: WriteError, atomic writes, torch.save, images, JSON, CSV
memory       CPU inference memory: freed memory reused and given back, weights released
distributed  Distributed: this process's place in a torchrun job
run_safety   the run lock, stop signals (GracefulStop), loading workers and their exit hook
figures      comparison panels (input | real | generated | difference) and the loss curve
fast_conv    the optional CPU convolution paths: GEMM, scattered patches, Winograd
"""

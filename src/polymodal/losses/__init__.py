"""Loss terms as pure functions of tensors (no modules, no state); modules call them and return
the unweighted terms by name, and the training schedule weights them."""

"""Export: integerisation of a trained student and the integer artifact writer."""

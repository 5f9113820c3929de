/* The int8 path on aarch64 with the dot-product extension (sdot): to be written (issue 15). */
#if defined(__aarch64__)
#endif

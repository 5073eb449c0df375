//! Tests of the controllers together (each model's own tests are in its
//! file).

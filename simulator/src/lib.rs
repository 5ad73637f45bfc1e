//! trackgate simulator library. (Being written.)

//! trackgate listener library. (Being written.)

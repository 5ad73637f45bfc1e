//! trackgate operator library. (Being written.)

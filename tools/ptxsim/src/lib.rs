//! ptxsim: a PTX interpreter (see issue 3). Work in progress.

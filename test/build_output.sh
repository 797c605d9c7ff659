# test/build_output.sh: reading make's output, for test/run_tests.sh, which
# sources it (test/test_build_output.py tests it).
#
# announce_builds: make echoes each command as it starts it; this prints at
# once, for each, the file it builds (its "-o FILE"), so a build of minutes
# shows what it is doing. compiler_warnings: the warning lines of the
# compilers and linkers (gcc and g++, nvcc and its front end, ptxas, nvlink,
# ld), never make's own (a clock-skew warning is about the file system, not
# the code).

announce_builds() {
    sed -n -u -E 's/^.* -o ([^ ]+)( .*)?$/     \1/p'
}

compiler_warnings() {
    grep -E '^([^ ]+:[0-9]+(:[0-9]+)?: |[^ ]+\([0-9]+\): |([^ ]*/)?(cc1|cc1plus|gcc|g\+\+|nvcc|cudafe\+\+|ptxas|nvlink|ld|collect2)( ?: | ))warning'
}
